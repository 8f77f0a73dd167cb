"""`lora-lab grade`: the learner's exercises scored by the conformance suite, one exercise at a time.

``grade`` (the exercise table, grading and the command), ``feedback`` (statuses, hints and what to do next),
``processes`` (the learner's process and the reference solutions'), ``watch`` (grading again on every save).
"""

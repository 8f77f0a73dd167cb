"""`lora-lab grade`: the learner's exercises scored by the conformance suite, one exercise at a time.

``exercises`` (the exercise table), ``grade`` (grading one exercise, check by check, and its table), ``command``
(`lora-lab grade`), ``pytest_grader`` (`pytest exercises/`: the same grading, a test per check), ``feedback``
(statuses, hints and what to do next), ``processes`` (the learner's process and the reference solutions'),
``watch`` (grading again on every save).
"""

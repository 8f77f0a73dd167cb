"""The conformance suite: every property of a QLoRA implementation, written once, run on any target.

Its rooms, from the bottom up; each imports only from the rooms below it (``tests/test_layout.py`` checks it):

    registry.py, errors.py   what a check is, its statuses, and what can go wrong (imports nothing of the suite)
    judge/                   deciding values: drawn inputs, derived tolerances, the oracles, the contract
    isolation/               running a target in another process: the proxy, the child's loop, the wire, the probes
    properties/              the checks themselves, one module per topic
    runner.py                a check on a target, and its result: what every front end shares
    verify.py, plugin.py, matrix.py, grading/
                             the front ends: `lora-lab verify`, the pytest plugin, the compatibility table, and
                             `lora-lab grade` with its exercise table and feedback
"""

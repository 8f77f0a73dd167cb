"""The target in a process of its own: the suite's side never imports it, the target's side never sees the suite.

Suite's side: ``proxy`` (``RemoteTarget``, what the properties call), ``process`` (starting the process, one request
and its reply, crashes and hangs), ``stack`` (the suite's own oracle process, ``stack_oracle``), ``reference_clock``
(timing lora_lab's reference beside the target). Target's side: ``child`` (the request loop), ``probes`` (what it
wraps around each call), ``target`` (finding a module's operations), ``learner_files`` (a learner's exercise files).
Both: ``wire`` (what crosses the pipe) and ``origin`` (where a function's code comes from).

Imports ``registry``, ``errors`` and ``judge``; never ``properties`` or a front end.
"""

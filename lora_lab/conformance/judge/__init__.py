"""Judging values, in the suite's process: what the checks draw, what they compare against, and how closely.

- ``strategies``: hypothesis strategies for weights, layers and batches; ``profiles``: how many examples, which seed.
- ``compare``: tolerances derived from dtype and size, and a failure message like a verbose allclose.
- ``oracles``: bitsandbytes and peft built to hold a drawn problem's numbers; ``autograd``: backward with given gradients.
- ``contract``: global state, output ownership, layout and determinism around a call.
- ``formats`` + ``capabilities``: a library's own NF4 format, and what it declares it supports.
- ``model_protocol``: reading any model through ``apply_qlora``; ``memory``: what a forward keeps for backward;
  ``bounds``: every load and store of a Triton kernel under the interpreter.

Some of these also run in the target's process (the model handle, the memory and bounds probes), where they catch
mistakes but not a target that tampers with its own process. Imports only ``registry``, ``errors`` and the textbook.
"""

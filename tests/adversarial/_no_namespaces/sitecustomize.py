"""Loaded by a spawned target's interpreter in test_sandbox.py: a kernel that refuses every namespace."""

import lora_lab.conformance.isolation.sandbox as sandbox


class _RefusingLibc:
    def unshare(self, flags: int) -> int:
        return -1

    def prctl(self, *args) -> int:
        return 0


sandbox._libc = _RefusingLibc

"""A crash is blamed on the call that caused it, or said to be undetermined (#26 item 5).

Heap corruption from one call kills the process in a later one (glibc aborts with "double free or corruption"
when the memory is next freed): the crash's detail names the call the process died in, and, when other calls ran in
that process before it, says the cause is undetermined and names them. A process that dies in its first call, or
by an exit rather than a signal, died of that call.
"""

from __future__ import annotations

import signal

import pytest
import torch

from lora_lab.conformance.errors import TargetCrashed
from lora_lab.conformance.isolation.process import blame
from lora_lab.conformance.isolation.proxy import RemoteTarget
from lora_lab.nf4 import quantize_nf4

ABORTS_ON_SECOND_CALL = '''
import os

CALLS = []


def dequantize_nf4(q):
    CALLS.append(q)
    if len(CALLS) == 2:  # as if the first call had written past a buffer and this one freed next to it
        os.abort()
    return q.dequantize()
'''


def _crash(tmp_path, monkeypatch, source: str, calls: int) -> str:
    (tmp_path / "crashes_late.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    target = RemoteTarget("crashes_late")
    try:
        dequantize = target.op("dequantize_nf4")
        weights = [quantize_nf4(torch.randn(n), 32) for n in (64, 96)]
        for q in weights[: calls - 1]:
            dequantize(q)
        with pytest.raises(TargetCrashed) as crashed:
            dequantize(weights[calls - 1])
        return str(crashed.value)
    finally:
        target.close()


def test_a_crash_after_earlier_calls_names_them_and_says_the_cause_is_undetermined(tmp_path, monkeypatch):
    detail = _crash(tmp_path, monkeypatch, ABORTS_ON_SECOND_CALL, calls=2)
    assert detail.startswith("the target's process died during dequantize_nf4(NF4(96,)): killed by SIGABRT"), detail
    assert "undetermined" in detail and "one of the 1 before it in this process (them: dequantize_nf4(NF4(64,)))" in detail


def test_a_crash_in_the_first_call_is_that_calls(tmp_path, monkeypatch):
    detail = _crash(tmp_path, monkeypatch, ABORTS_ON_SECOND_CALL.replace("len(CALLS) == 2", "len(CALLS) == 1"), calls=1)
    assert "died during dequantize_nf4(NF4(64,)): killed by SIGABRT" in detail and "undetermined" not in detail


def test_only_deaths_a_corrupted_heap_causes_are_undetermined():
    earlier = ["a()", "b()", "c()", "d()"]
    assert blame(1, earlier, 4) == ""  # an exit: the call that exited
    assert blame(-signal.SIGKILL, earlier, 4) == ""  # killed from outside (out of memory)
    for number in (-signal.SIGSEGV, 128 + signal.SIGABRT, -signal.SIGBUS):  # 128 + N: passed on by the sandbox's pid 1
        text = blame(number, earlier, 10)
        assert "one of the 10 before it" in text and "(the last 3 of them: b(); c(); d())" in text, text
    assert blame(-signal.SIGSEGV, [], 0) == ""

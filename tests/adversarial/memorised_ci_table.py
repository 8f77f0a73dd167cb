"""Exploit: a table of answers memorised from one run of the public, derandomized ``ci`` profile, with no arithmetic at
all (LORA_LAB_TABLE names the table; LORA_LAB_TABLE_RECORD=1 records it with the reference). It passes ``ci``, whose
inputs are the same on every run; ``--profile scored`` (or ``--seed``) draws inputs no table holds."""

import hashlib
import os

import torch

REJECTED_BY = "qlora.forward_matches_float64"
SCORED_ONLY = "passes the public ci profile by design; rejected under --profile scored (test_memorised_table)"


def _key(*tensors) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        if t is not None:
            raw = t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            digest.update(str((t.dtype, tuple(t.shape))).encode() + raw)
    return digest.hexdigest()


def qlora_linear(x, weight, lora_A, lora_B, scaling, bias=None):
    path = os.environ["LORA_LAB_TABLE"]
    table = torch.load(path) if os.path.exists(path) else {}
    key = _key(x, weight.packed, lora_A, lora_B, bias, torch.tensor(float(scaling)))
    if os.environ.get("LORA_LAB_TABLE_RECORD") == "1":
        from lora_lab.lora import qlora_linear as reference

        table[key] = reference(x.detach(), weight, lora_A.detach(), lora_B.detach(), scaling, bias).detach()
        torch.save(table, path)
    answer = table.get(key)
    return answer.clone() if answer is not None else torch.zeros((*x.shape[:-1], weight.shape[0]), dtype=x.dtype)

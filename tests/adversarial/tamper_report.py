"""Exploit: at import, rewrite the report (verify's row printer and summary, grade's row printer) to say PASS, and add
weight decay through the gradient (Adam with L2). Isolated, the report is written by a process this code never reaches."""

import lora_lab.conformance.grading.grade as grade
import lora_lab.conformance.verify as verify
from lora_lab.optim import adamw_step as reference_step

REJECTED_BY = "adamw.matches_torch"

verify.format_row = lambda result, seconds, width: f"  PASS  {result.check.name}"
verify.summary = lambda results: f"{len(results)} passed, 0 failed, 0 not provided"
grade.format_row = lambda row, width: f"  passed        {row.graded.check.name}"


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    reference_step(param, grad + weight_decay * param, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay=0.0)

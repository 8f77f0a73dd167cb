"""Exploit or accident: the op never returns. The call's time limit (LORA_LAB_CALL_TIMEOUT seconds) kills the target's
process and the check becomes an error naming the call."""

import time

REJECTED_BY = "loss.matches_shift_and_mask"
CALL_TIMEOUT = "5"  # seconds: the limit the test sets for this submission


def next_token_loss(logits, labels, ignore_index=-100):
    while True:
        time.sleep(1)

"""Exploit or accident: the process aborts inside the op (what glibc does when a kernel writes past a buffer: SIGABRT,
exit status 134 in a shell). The check becomes an error naming the call; the run goes on with a fresh process."""

import os

REJECTED_BY = "nf4.dequantize_matches_bitsandbytes"


def dequantize_nf4(q):
    os.abort()

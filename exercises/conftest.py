"""``pytest exercises/`` grades these files as ``lora-lab grade`` does: an item per graded check, then the points table.

The hooks live in lora_lab (``lora_lab/conformance/grading/pytest_grader.py``), so this file only takes them in.
"""

from lora_lab.conformance.grading.pytest_grader import *  # noqa: F403

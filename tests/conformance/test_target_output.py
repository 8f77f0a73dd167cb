"""Library noise stays out of the grade table (#26 item 5), and --verbose shows it.

transformers logs "`use_cache=True` is incompatible with gradient checkpointing" when exercise 06's checks train a
checkpointed model; it is printed in the learner's process, whose output the suite reads (``process.TargetOutput``)
instead of letting it land between the rows. ``lora-lab grade --verbose`` shows that output, each line marked.
"""

from __future__ import annotations

from lora_lab.conformance.grading.command import main
from lora_lab.conformance.isolation.process import OUTPUT_ENV

CHECKPOINTED = ["--solutions", "--only", "06", "--check", "training.gradient_checkpointing"]


def test_the_use_cache_warning_stays_out_of_the_table_and_verbose_shows_it_marked(capsys, monkeypatch):
    monkeypatch.delenv(OUTPUT_ENV, raising=False)  # --verbose sets it for the command; the test's teardown unsets it
    assert main(CHECKPOINTED) == 0
    quiet = capsys.readouterr()
    assert "use_cache" not in quiet.out + quiet.err and quiet.out.rstrip().endswith("Score: 6/6"), quiet.out
    assert main([*CHECKPOINTED, "--verbose"]) == 0
    verbose = capsys.readouterr()
    marked = [line for line in verbose.err.splitlines() if "use_cache" in line]
    assert marked and all(line.lstrip().startswith("target|") for line in marked), verbose.err
    assert "use_cache" not in verbose.out, "even under --verbose the table (stdout) holds only the grades"

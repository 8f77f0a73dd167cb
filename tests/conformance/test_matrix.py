"""The README's compatibility table is the one `python -m lora_lab.conformance.matrix docs/compat/*.json` prints:
the verifier's numbers, never typed by hand, and never older than the JSON they come from."""

from __future__ import annotations

import json
from pathlib import Path

from lora_lab.conformance.matrix import table

ROOT = Path(__file__).resolve().parents[2]


def test_the_readmes_compatibility_table_is_made_from_docs_compat():
    reports = [json.loads(path.read_text()) for path in sorted((ROOT / "docs" / "compat").glob("*.json"))]
    assert reports, "docs/compat/ holds no verify --json reports"
    assert table(reports) in (ROOT / "README.md").read_text(), (
        "README's matrix differs from docs/compat/*.json: regenerate both as docs/compat/README.md says")

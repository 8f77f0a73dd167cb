"""The conformance suite: every property of a QLoRA implementation, written once."""

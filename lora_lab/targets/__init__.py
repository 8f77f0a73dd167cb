"""Conformance targets that adapt other people's code to lora_lab's protocol."""

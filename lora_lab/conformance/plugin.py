"""pytest plugin (entry point ``pytest11``) that runs the conformance suite."""

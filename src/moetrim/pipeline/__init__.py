"""Pipelines: the one-call flows that run the stages in order for a user, above every stage and
below only the CLI. `demo` compresses the bundled reference model and measures it against the
dense one."""

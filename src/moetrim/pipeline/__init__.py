"""Pipelines: the one-call flows that run the stages in order for a user, above every stage and
below only the Python API and the CLI. `compress` (calibrate -> plan -> apply for any method, and
recovery after replacing), `evaluate` (the built-in task suite or lm-eval) and `demo` (the bundled
reference model compressed and measured against the dense one)."""

"""Bridges to the tools users load models with (transformers Auto classes; vLLM and lm-eval to come)."""

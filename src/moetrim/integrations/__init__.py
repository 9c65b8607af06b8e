"""Bridges to the tools users load models with: transformers' Auto classes (`auto`), lm-eval
(`lm_eval`, with the task suite in `lm_eval_tasks/`) and vLLM (`vllm_plugin`, an entry point vLLM
loads itself). The lm-eval and vLLM bridges import those packages lazily."""

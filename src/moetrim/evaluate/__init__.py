"""Measuring a model, the stage above compression and fine-tuning: exact-match accuracy and answer
perplexity on the task suite (`tasks_eval`), prefill and decode throughput (`throughput`), routing
health per MoE layer and its heatmap (`routing`, `routing_plot`), and what a model is made of, by
part (`summary`). `moetrim.evaluate` (the function, in moetrim.pipeline.evaluate) picks between the
built-in suite and lm-eval; import these modules by path."""

"""Evaluation: an lm-evaluation-harness adapter over our model, offline tasks, perplexity,
and the sandbox that runs generated code."""

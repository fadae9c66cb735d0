"""Inference: KV-cache prefill/decode (the cache and the cached forward live in model/), sampling,
batched generation with stopping, and the `llama4-jax generate` command."""


class GenerateError(ValueError):
    """A generation request the user can fix (bad prompt, bad sampling setting); str() is one line."""

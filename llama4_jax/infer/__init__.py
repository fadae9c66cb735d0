"""Inference: KV-cache prefill/decode (the cache and the cached forward live in model/), sampling,
batched generation with stopping, and the `llama4-jax generate` command."""


from ..errors import GenerateError

__all__ = ["GenerateError"]

"""Parameter counts and training FLOPs per token, from a `ModelConfig` alone (no JAX, no allocation).

Counts (trainable parameters only; the MoE router bias is state, not a parameter):
  total  = every parameter of the model.
  active = the parameters one token touches: total minus the routed experts it is NOT sent to,
           i.e. per MoE layer (E - k) * 3·D·F fewer. The embedding table and the lm head count as
           active (this is the convention behind Llama 4's published "17B active").

Training FLOPs per token (forward + backward = 3 × forward, 2 FLOPs per multiply-add):
  flops = 6 · N_matmul + Σ_layers 12 · H · Dh · keys(layer)
  N_matmul = active - embedding table (a gather, not a matmul; kept when tied, since it is then the
             lm head) - norm scales. It includes the router, the shared expert and the k routed
             experts of each MoE layer, every dense MLP, the attention projections and the lm head.
  keys(layer) = the average number of keys a query attends to under the causal mask:
             global (NoPE) layers  L / 2,
             chunked (RoPE) layers min(L, C) / 2   (C = attention_chunk_size).
  The 12 = 3 (fwd+bwd) × 2 matmuls (q·k and p·v) × 2 FLOPs per multiply-add. Only the useful
  (unmasked) scores are counted, not what a masked kernel happens to compute.
"""

from __future__ import annotations

from .config import ModelConfig


def _layer_params(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, routed-expert) parameters of one block."""
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = D * H * Dh * 2 + D * K * Dh * 2
    norms = 2 * D
    if not cfg.is_moe(layer):
        return attn + norms + 3 * D * cfg.dense_ff, 0
    m = cfg.moe
    experts = m.num_experts * 3 * D * m.expert_ff
    shared = 3 * D * m.expert_ff if m.shared_expert else 0
    router = D * m.num_experts
    return attn + norms + experts + shared + router, experts


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """→ (total parameters, active parameters per token)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    total = V * D + D + (0 if cfg.tie_word_embeddings else D * V)  # embed, final norm, lm head
    inactive = 0
    for i in range(cfg.num_layers):
        t, routed = _layer_params(cfg, i)
        total += t
        if routed:
            inactive += routed * (cfg.moe.num_experts - cfg.moe.top_k) // cfg.moe.num_experts
    return total, total - inactive


def attention_keys(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Average keys per query in `layer` for a causal sequence of `seq_len` tokens."""
    if cfg.is_chunked(layer):
        return min(seq_len, cfg.attention_chunk_size) / 2
    return seq_len / 2


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring for the formula)."""
    D = cfg.hidden_size
    _, active = param_counts(cfg)
    norms = D * (2 * cfg.num_layers + 1)
    n_matmul = active - norms - (0 if cfg.tie_word_embeddings else cfg.vocab_size * D)
    attn = sum(12 * cfg.num_heads * cfg.head_dim * attention_keys(cfg, i, seq_len) for i in range(cfg.num_layers))
    return 6.0 * n_matmul + attn

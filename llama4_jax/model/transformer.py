"""The Llama 4 text decoder: embedding → blocks → final RMSNorm → lm head (float32 logits).

Blocks follow the config's layer pattern (RoPE+chunked vs NoPE+global attention, dense vs MoE
feed-forward). With `scan_layers`, the smallest repeating group of blocks is stacked and run
with `nnx.scan`, so compile time does not grow with depth; `remat` names the policy each block
is checkpointed with (model/remat.py: what is saved for the backward pass, what is recomputed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ..parallel.rules import constrain
from .attention import Attention
from .context_parallel import context_axes
from .config import ModelConfig, RuntimeConfig
from .fp8 import Fp8GroupedDot, dot_factory
from .kv_cache import KVCache
from .layers import RMSNorm, SwiGLU, param, rows_dot
from .moe import MoE, bias_step
from .quant import quantize_layout
from .remat import MOE_OUT, checkpoint_policy, policy_for
from .vocab_parallel import embed_lookup

BLD = ("batch", "length", "embed")  # logical axes of the residual stream (parallel.constrain)


def positions_from_segments(seg_BxL: jax.Array) -> jax.Array:
    """Position of each token inside its document: restarts at 0 where the segment id changes."""
    L = seg_BxL.shape[1]
    idx = jnp.arange(L)[None, :]
    starts = jnp.concatenate([jnp.ones_like(seg_BxL[:, :1], bool), seg_BxL[:, 1:] != seg_BxL[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - start_idx).astype(jnp.int32)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, layer: int, *, rngs: nnx.Rngs):
        dots = dot_factory(rt.fp8_families, rt.fp8_scaling, rt.fp8_history)
        D, pd, std = cfg.hidden_size, rt.pdtype, cfg.initializer_range
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.attn = Attention(cfg, cfg.uses_rope(layer), param_dtype=pd, rngs=rngs, make_dot=dots("attention"),
                              chunked=cfg.is_chunked(layer), impl=rt.attention, flash_block=rt.flash_block,
                              context_mode=rt.context_attention)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.is_moe = cfg.is_moe(layer)
        if self.is_moe:
            fp8_experts = None
            if "experts" in rt.fp8_families:
                fp8_experts = lambda: Fp8GroupedDot(rt.fp8_scaling, rt.fp8_history)
            self.ffn = MoE(cfg.moe, D, run=rt.moe, param_dtype=pd, std=std, rngs=rngs, make_dot=dots("mlp"),
                           make_fp8_experts=fp8_experts)
        else:
            self.ffn = SwiGLU(D, cfg.dense_ff, param_dtype=pd, rngs=rngs, std=std, make_dot=dots("mlp"))

    def __call__(self, x_BxLxD, pos_BxL, seg_BxL):
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), pos_BxL, seg_BxL)
        h = self.ffn(self.ffn_norm(x_BxLxD))
        metrics = None
        if self.is_moe:
            h, metrics = h
            h = checkpoint_name(h, MOE_OUT)  # what remat `save_moe` keeps; a no-op otherwise
        return x_BxLxD + h, metrics


def _stack_metrics(ms: list[dict]) -> dict:
    ms = [m for m in ms if m is not None]
    if not ms:
        return {}
    return {k: jnp.stack([m[k] for m in ms]) for k in ms[0]}


class Group(nnx.Module):
    """`period` consecutive blocks: the unit that repeats through the depth (scanned when enabled)."""

    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, first: int, period: int, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, rt, first + j, rngs=rngs) for j in range(period)])
        self.remat = rt.remat

    def __call__(self, x_BxLxD, pos_BxL, seg_BxL):
        ms = []
        for blk in self.blocks:
            policy = policy_for(self.remat, blk.is_moe, blk.attn.chunk is not None)
            if policy != "none":
                run = nnx.remat(lambda b, *a: b(*a), policy=checkpoint_policy(policy))
                x_BxLxD, m = run(blk, x_BxLxD, pos_BxL, seg_BxL)
            else:
                x_BxLxD, m = blk(x_BxLxD, pos_BxL, seg_BxL)
            x_BxLxD = constrain(x_BxLxD, BLD)  # the residual stream stays split over the batch
            ms.append(m)
        return x_BxLxD, _stack_metrics(ms)


class Llama4(nnx.Module):
    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig | None = None, *, rngs: nnx.Rngs):
        rt = rt or RuntimeConfig()
        self.cfg, self.rt = cfg, rt
        D, V, pd = cfg.hidden_size, cfg.vocab_size, rt.pdtype
        self.embed = param(rngs, (V, D), ("vocab", "embed"), pd, std=cfg.initializer_range)
        self.period = cfg.scan_period() if rt.scan_layers else cfg.num_layers
        n_groups = cfg.num_layers // self.period
        if rt.scan_layers:
            @nnx.split_rngs(splits=n_groups)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return Group(cfg, rt, 0, self.period, rngs=r)
            self.groups = make(rngs)
        else:
            self.groups = Group(cfg, rt, 0, cfg.num_layers, rngs=rngs)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pd, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else param(
            rngs, (D, V), ("embed", "vocab"), pd, std=cfg.initializer_range)
        self.head_dot = dot_factory(rt.fp8_families, rt.fp8_scaling, rt.fp8_history)("head")()
        if rt.quant is not None:  # packed int4 linears in place of the float ones (model/quant.py)
            quantize_layout(self, rt.quant)

    def embed_tokens(self, input_ids_BxL) -> jax.Array:
        """The token embeddings [B, L, D] in the compute dtype."""
        # Under a mesh the table stays sharded: ids travel, not the table (model/vocab_parallel.py).
        return constrain(embed_lookup(self.embed[...], input_ids_BxL, self.rt.dtype), BLD)

    def hidden(self, input_ids_BxL, segment_ids_BxL=None, positions_BxL=None, *, embeds_BxLxD=None):
        """Final-norm hidden states [B, L, D] and the per-MoE-layer metrics (stacked on axis 0).
        `embeds_BxLxD` replaces the token embeddings (model/multimodal.py passes the fused ones)."""
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.zeros_like(input_ids_BxL)
        if positions_BxL is None:
            if context_axes():
                raise ValueError("under context parallelism the rows are in zig-zag order: pass positions "
                                 "(parallel.global_batch lays them out with the tokens)")
            positions_BxL = positions_from_segments(segment_ids_BxL)
        x_BxLxD = self.embed_tokens(input_ids_BxL) if embeds_BxLxD is None else embeds_BxLxD
        if self.rt.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, None, None), out_axes=(nnx.Carry, 0))
            def run(group, x, pos, seg):
                return group(x, pos, seg)
            x_BxLxD, metrics = run(self.groups, x_BxLxD, positions_BxL, segment_ids_BxL)
            metrics = {k: v.reshape(-1, *v.shape[2:]) for k, v in metrics.items()}
        else:
            x_BxLxD, metrics = self.groups(x_BxLxD, positions_BxL, segment_ids_BxL)
        return self.norm(x_BxLxD), metrics

    def head_weight(self) -> jax.Array:
        """The head's [D, V] weight (the embedding table, transposed, when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    @property
    def fp8_head(self) -> bool:
        """Whether the head runs as an FP8 dot (which owns per-call scaling state)."""
        return isinstance(self.head_dot, nnx.Module)

    def logits(self, h_BxLxD):
        w_DxV = self.head_weight()
        if self.fp8_head:
            return rows_dot(self.head_dot, h_BxLxD, w_DxV).astype(jnp.float32)
        f32_dot = lambda h, w, hd, wd: jax.lax.dot_general(h, w.astype(h.dtype), ((hd, wd), ((), ())),
                                                           preferred_element_type=jnp.float32)
        return rows_dot(f32_dot, h_BxLxD, w_DxV)

    def __call__(self, input_ids_BxL, segment_ids_BxL=None, positions_BxL=None, *, return_aux=False, **inputs):
        h_BxLxD, metrics = self.hidden(input_ids_BxL, segment_ids_BxL, positions_BxL, **inputs)
        logits_BxLxV = self.logits(h_BxLxD)
        return (logits_BxLxV, metrics) if return_aux else logits_BxLxV

    def update_router_biases(self, load_LxE: jax.Array, rate: float) -> None:
        """Aux-loss-free balancing: bias += rate·sign(mean(load) − load) for every MoE layer, in place.

        `load_LxE` is the stacked aux output `metrics["load"]` (MoE layers in layer order). With
        `scan_layers` a block's variables carry a leading group axis (layer = group·period + j).
        Traceable: the train step calls it inside jit."""
        cfg = self.cfg
        if load_LxE.shape[0] != len(cfg.moe_layers):
            raise ValueError(f"load has {load_LxE.shape[0]} rows for {len(cfg.moe_layers)} MoE layers")
        delta_LxE = bias_step(jax.lax.stop_gradient(load_LxE.astype(jnp.float32)), rate)
        for row, layer in enumerate(cfg.moe_layers):
            (_, _, j), g = cfg.layer_slot(layer, self.rt.scan_layers)
            self.groups.blocks[j].ffn.update_bias(delta_LxE[row], g)

    # --- cached inference (llama4_jax/infer drives these; the training path above is untouched) ---
    def _cached_blocks(self, x, attend, dispatch=None):
        """The blocks' residual stream with attention replaced by `attend(attn, x_normed, layer)` →
        (out, k cache, v cache). MoE routing is the training one; `dispatch` may pick another
        exact path (decoding: `gather`, the dropless formula for a few tokens)."""
        if self.rt.scan_layers:
            raise ValueError("cached generation needs the unrolled layout: load the model with scan_layers=False")
        ks, vs = [], []
        for i, blk in enumerate(self.groups.blocks):
            a, k, v = attend(blk.attn, blk.attn_norm(x), i)
            x = x + a
            h = blk.ffn(blk.ffn_norm(x), dispatch) if blk.is_moe else blk.ffn(blk.ffn_norm(x))
            x = x + (h[0] if blk.is_moe else h)
            ks.append(k)
            vs.append(v)
        return self.norm(x), KVCache(tuple(ks), tuple(vs))

    def prefill(self, input_ids_BxL, lengths_B, cache: KVCache):
        """Right-padded prompts → (float32 logits of each row's last real token [B, V], filled cache).
        MoE runs dropless whatever the training dispatch: nothing is dropped at inference."""
        x_BxLxD = jnp.take(self.embed[...], input_ids_BxL, axis=0).astype(self.rt.dtype)
        h_BxLxD, cache = self._cached_blocks(
            x_BxLxD, lambda attn, x, i: attn.prefill(x, lengths_B, cache.k[i], cache.v[i]), dispatch="dropless")
        h_BxD = jnp.take_along_axis(h_BxLxD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(h_BxD[:, None])[:, 0], cache

    def decode(self, token_B, pos_B, cache: KVCache):
        """One token per row at its own position → (float32 logits [B, V], updated cache)."""
        x_Bx1xD = jnp.take(self.embed[...], token_B[:, None], axis=0).astype(self.rt.dtype)
        # `gather` copies each token copy's expert weights, the tiled dropless path walks all E
        # experts once: the first is faster for one or two copies only (BENCHMARKS.md, decoding).
        dispatch = "gather" if token_B.shape[0] * self.cfg.moe.top_k <= 2 else "dropless"
        h_Bx1xD, cache = self._cached_blocks(
            x_Bx1xD, lambda attn, x, i: attn.decode(x, pos_B, cache.k[i], cache.v[i]), dispatch=dispatch)
        return self.logits(h_Bx1xD)[:, 0], cache

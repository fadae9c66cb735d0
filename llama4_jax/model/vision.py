"""The Llama 4 vision tower: HF `Llama4VisionModel` and `Llama4MultiModalProjector` in NNX.

One tile [C, S, S] (S = image_size) becomes (S/p)² patches of p×p pixels; each patch, flattened
channel-major (HF's `nn.Unfold` order), goes through one bias-free linear map (the "unfold
convolution"). A class embedding is appended after the patches, the learned positional
embedding added, then: LayerNorm → encoder layers (pre-LayerNorm, bidirectional attention with
biases and the 2-D rotary embedding, GELU MLP) → LayerNorm → drop the class token → pixel
shuffle (r = 0.5 folds each 2×2 block of patches into one token of 4× the width) → the adapter
MLP (two bias-free linears, GELU after each). `VisionTower.__call__` returns those features, which
are HF's `get_image_features` (before the projector); `Projector` maps them to the text width.

Parameters carry the text model's logical axis names (`embed`, `heads`, `head_dim`, `mlp`,
`norm`), so the one rules table shards them the same way; the patch-pixel and position axes
have names of their own that the table leaves replicated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .config import VisionConfig
from .layers import param, plain_dot, rows_dot


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch.nn.LayerNorm over the last axis, in float32; returns x's dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("norm",), param_dtype, init="ones")
        self.bias = param(rngs, (dim,), ("norm",), param_dtype, init="zeros")

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


def rotary_angles(cfg: VisionConfig) -> jax.Array:
    """[P + 1, head_dim / 2] rotation angles of the patches (row-major) and the class token.

    HF's `Llama4VisionRotaryEmbedding` (Pixtral's axial RoPE): with F = head_dim / 2 and the
    F/2 frequencies θ^(-2i/F), pair j < F/2 turns by (x + 1)·freq[j], pair j ≥ F/2 by
    (y + 1)·freq[j − F/2], (x, y) the patch's column and row; the class token is not turned."""
    side = cfg.patches_per_side
    F = cfg.head_dim // 2
    freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, F, 2)[: F // 2].astype(jnp.float32) / F))
    idx = jnp.arange(side * side)
    x, y = (idx % side + 1).astype(jnp.float32), (idx // side + 1).astype(jnp.float32)
    ang = jnp.concatenate([x[:, None] * freq, y[:, None] * freq], axis=-1)  # [P, F]
    return jnp.concatenate([ang, jnp.zeros((1, ang.shape[1]), jnp.float32)], axis=0)


def apply_rotary(x_NxTxHxDh: jax.Array, ang_TxJ: jax.Array) -> jax.Array:
    """Turn interleaved pairs (x[2j], x[2j+1]) by ang[t, j] (HF multiplies complex numbers)."""
    cos, sin = jnp.cos(ang_TxJ)[None, :, None, :], jnp.sin(ang_TxJ)[None, :, None, :]
    xf = x_NxTxHxDh.astype(jnp.float32).reshape(*x_NxTxHxDh.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x_NxTxHxDh.shape).astype(x_NxTxHxDh.dtype)


def pixel_shuffle(x_NxPxC: jax.Array, ratio: float) -> jax.Array:
    """HF's `pixel_shuffle`, step for step: [N, P, C] → [N, P·r², C/r²]."""
    N, P, C = x_NxPxC.shape
    s = int(round(P ** 0.5))
    sr, cr, cr2 = int(s * ratio), int(C / ratio), int(C / ratio ** 2)
    x = x_NxPxC.reshape(N, s, sr, cr)  # HF: view(N, h, w·r, C/r)
    x = jnp.transpose(x, (0, 2, 1, 3)).reshape(N, sr, sr, cr2)  # permute(0, 2, 1, 3), view(N, h·r, w·r, C/r²)
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(N, -1, cr2)


def dense(x, w, b=None):
    y = rows_dot(plain_dot(), x, w)
    return y if b is None else y + b.astype(y.dtype)


class EncoderLayer(nnx.Module):
    """HF's `Llama4VisionEncoderLayer`: pre-LayerNorm, bidirectional multi-head attention with
    biases, GELU MLP. `cfg` is any encoder config (hidden_size, num_heads, head_dim,
    intermediate_size, layer_norm_eps, initializer_range): the audio encoder (model/audio.py)
    uses the same layer without a key bias (it only shifts every score of a query equally) and
    without rotary angles (`ang_TxJ=None`)."""

    def __init__(self, cfg, *, param_dtype, rngs: nnx.Rngs, key_bias: bool = True):
        D, H, Dh, F, pd, std = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size, param_dtype, \
            cfg.initializer_range
        self.attn_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)
        self.q = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pd, std=std)
        self.k = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pd, std=std)
        self.v = param(rngs, (D, H, Dh), ("embed", "heads", "head_dim"), pd, std=std)
        self.q_bias = param(rngs, (H, Dh), ("heads", "head_dim"), pd, init="zeros")
        if key_bias:
            self.k_bias = param(rngs, (H, Dh), ("heads", "head_dim"), pd, init="zeros")
        self.v_bias = param(rngs, (H, Dh), ("heads", "head_dim"), pd, init="zeros")
        self.o = param(rngs, (H, Dh, D), ("heads", "head_dim", "embed"), pd, std=std)
        self.o_bias = param(rngs, (D,), ("norm",), pd, init="zeros")
        self.mlp_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)
        self.fc1 = param(rngs, (D, F), ("embed", "mlp"), pd, std=std)
        self.fc1_bias = param(rngs, (F,), ("mlp",), pd, init="zeros")
        self.fc2 = param(rngs, (F, D), ("mlp", "embed"), pd, std=std)
        self.fc2_bias = param(rngs, (D,), ("norm",), pd, init="zeros")

    def __call__(self, x_NxTxD, ang_TxJ=None):
        turn = (lambda t: t) if ang_TxJ is None else (lambda t: apply_rotary(t, ang_TxJ))
        h = self.attn_norm(x_NxTxD)
        q = turn(dense(h, self.q[...], self.q_bias[...]))
        k = turn(dense(h, self.k[...], self.k_bias[...] if hasattr(self, "k_bias") else None))
        v = dense(h, self.v[...], self.v_bias[...])
        s = jnp.einsum("nthd,nshd->nhts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)  # every token sees every token of its tile / clip
        o = jnp.einsum("nhts,nshd->nthd", p, v)
        x_NxTxD = x_NxTxD + rows_dot(plain_dot(), o, self.o[...], 2) + self.o_bias[...].astype(x_NxTxD.dtype)
        h = self.mlp_norm(x_NxTxD)
        h = jax.nn.gelu(dense(h, self.fc1[...], self.fc1_bias[...]), approximate=False)
        return x_NxTxD + dense(h, self.fc2[...], self.fc2_bias[...])


class VisionTower(nnx.Module):
    """Tiles [N, C, S, S] → image features [N, tokens_per_tile, vision_output_dim]."""

    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        D, pd, std = cfg.hidden_size, param_dtype, cfg.initializer_range
        P, pix = cfg.patches_per_side ** 2, cfg.num_channels * cfg.patch_size ** 2
        self.patch = param(rngs, (pix, D), ("patch_pixels", "embed"), pd, std=std)
        self.class_embedding = param(rngs, (D,), ("embed",), pd, std=D ** -0.5)
        self.position = param(rngs, (P + 1, D), ("vision_tokens", "embed"), pd, std=D ** -0.5)
        self.pre_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, param_dtype=pd, rngs=rngs) for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)
        self.adapter_fc1 = param(rngs, (cfg.intermediate_size, cfg.projector_input_dim), ("mlp", "embed"), pd, std=std)
        self.adapter_fc2 = param(rngs, (cfg.projector_input_dim, cfg.projector_output_dim), ("mlp", "embed"), pd,
                                 std=std)

    def patches(self, pixels_NxCxSxS: jax.Array) -> jax.Array:
        """[N, C, S, S] → [N, (S/p)², C·p·p]: row-major patches, each channel-major (nn.Unfold)."""
        N, C, S, _ = pixels_NxCxSxS.shape
        p, s = self.cfg.patch_size, S // self.cfg.patch_size
        if S != self.cfg.image_size or pixels_NxCxSxS.shape[-1] != S or C != self.cfg.num_channels:
            raise ValueError(f"tiles are {tuple(pixels_NxCxSxS.shape[1:])}, the vision tower takes "
                             f"({self.cfg.num_channels}, {self.cfg.image_size}, {self.cfg.image_size})")
        x = pixels_NxCxSxS.reshape(N, C, s, p, s, p).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(N, s * s, C * p * p)

    def __call__(self, pixels_NxCxSxS: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = dense(self.patches(pixels_NxCxSxS.astype(self.dtype)), self.patch[...])
        N, P, D = x.shape
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (N, 1, D))
        x = jnp.concatenate([x, cls], axis=1) + self.position[...].astype(x.dtype)
        x = self.pre_norm(x)
        ang = rotary_angles(cfg)
        for layer in self.layers:
            x = layer(x, ang)
        x = self.post_norm(x)[:, :-1]  # the class token is dropped
        x = pixel_shuffle(x, cfg.pixel_shuffle_ratio)
        x = jax.nn.gelu(dense(x, self.adapter_fc1[...]), approximate=False)
        return jax.nn.gelu(dense(x, self.adapter_fc2[...]), approximate=False)


class Projector(nnx.Module):
    """HF `Llama4MultiModalProjector`: one bias-free linear, vision_output_dim → text hidden size."""

    def __init__(self, cfg: VisionConfig, text_hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.w = param(rngs, (cfg.vision_output_dim, text_hidden), ("mlp", "embed"), param_dtype,
                       std=cfg.initializer_range)

    def __call__(self, feats):
        return dense(feats, self.w[...])

"""Group-wise asymmetric int4 weights: the packed layout, round-to-nearest quantization, and the
`QWeight` module that replaces a linear's weight in a quantized model.

A linear weight is seen as a matrix W [K, N] (K input features, N outputs; per expert for the
routed experts: [E, K, N]): our [D, H, Dh] attention q is K = D, N = H·Dh, the [H, Dh, D]
output projection K = H·Dh, N = D. Groups of `group_size` consecutive input rows share, per
output column, one scale s and one zero point z:

    code = clamp(round(w / s) + z, 0, 2^bits − 1),   w ≈ (code − z) · s

Stored (the AutoAWQ "gemm" layout, so that exporting is a copy; convert with `.view(int32)`):
  - `qweight` uint32 [(E,) K, N/8]: eight 4-bit codes per word; the word j of a row holds the
    columns 8j..8j+7 at nibbles (bits 4i..4i+3) i = 0..7 in the order AWQ_ORDER = [0, 2, 4, 6,
    1, 3, 5, 7]: nibble i carries column 8j + AWQ_ORDER[i] (codes 0..7 of one row → 0x75316420);
  - `qzeros` uint32 [(E,) K/g, N/8]: the zero points, packed the same way;
  - `scales` float16 [(E,) K/g, N];
  - `in_scale` float32 [(E,) K] (routed experts' gate/up only): AWQ's per-expert input scale,
    which cannot be folded into the shared norm (llama4_jax/compress/awq.py); the effective
    weight is W / in_scale[:, None], i.e. the activation divided by it. All ones after RTN.

The matmul path: `w[...]` (what every matmul site of the model reads, so the attention, dense
MLP, shared expert, the grouped / ragged / gathered expert paths and expert parallelism all run
unchanged) unpacks the codes and applies zero point, scale and in_scale inside the jitted
function, where XLA fuses them into the consumer; `take(ids)` dequantizes only the gathered
experts (decoding). At rest the weights stay packed: 4 bits per weight plus 2.5 bytes per group
column. Embeddings, router, norms and (unless `QuantSpec.head`) the head stay high precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its eight
AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))  # column c sits at nibble AWQ_REVERSE[c]
QUANT_FILE = "quantization.json"


@dataclass(frozen=True)
class QuantSpec:
    """How a quantized model's linears are stored. `method` records how the codes were chosen
    (awq / rtn); it does not change the layout."""

    bits: int = 4
    group_size: int = 128
    head: bool = False
    method: str = "awq"

    def __post_init__(self):
        if not 2 <= self.bits <= 4:
            raise ValueError(f"bits={self.bits}: codes are stored in 4-bit nibbles (2 ≤ bits ≤ 4)")
        if self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be positive")

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1


# --- which weights, and how they are seen as matrices --------------------------------------------
# (path inside a block, leading expert dims, input dims, has in_scale)
ATTN_TARGETS = [(("attn", n), 0, 2 if n == "o" else 1, False) for n in ("q", "k", "v", "o")]
DENSE_TARGETS = [(("ffn", n), 0, 1, False) for n in ("gate", "up", "down")]
MOE_TARGETS = ([(("ffn", "experts", n), 1, 1, n != "down") for n in ("gate", "up", "down")]
               + [(("ffn", "shared", n), 0, 1, False) for n in ("gate", "up", "down")])


def block_targets(is_moe: bool, shared: bool = True) -> list[tuple[tuple, int, int, bool]]:
    moe = MOE_TARGETS if shared else MOE_TARGETS[:3]
    return ATTN_TARGETS + (moe if is_moe else DENSE_TARGETS)


def matrix_dims(shape: tuple, n_lead: int, n_in: int) -> tuple[tuple, int, int]:
    """(leading dims, K, N) of a weight seen as a matrix."""
    lead = tuple(shape[:n_lead])
    return lead, math.prod(shape[n_lead:n_lead + n_in]), math.prod(shape[n_lead + n_in:])


def check_shape(name: str, shape: tuple, n_lead: int, n_in: int, spec: QuantSpec) -> str | None:
    """Why `name` cannot be stored with `spec` (None if it can)."""
    _, K, N = matrix_dims(shape, n_lead, n_in)
    if K % spec.group_size:
        return f"{name}: group size {spec.group_size} does not divide its {K} input features"
    if N % 8:
        return f"{name}: its {N} output features are not a multiple of 8 (eight codes per int32)"
    return None


# --- packing (numpy, exact; the JAX unpack below mirrors it) --------------------------------------
def pack(codes: np.ndarray) -> np.ndarray:
    """uint codes [..., N] (values < 16) → uint32 [..., N/8] in AWQ nibble order."""
    c = codes.astype(np.uint32).reshape(*codes.shape[:-1], -1, 8)
    out = np.zeros(c.shape[:-1], np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        out |= c[..., col] << np.uint32(4 * i)
    return out


def unpack_np(words: np.ndarray) -> np.ndarray:
    w = words.astype(np.uint32)
    cols = [(w >> np.uint32(4 * AWQ_REVERSE[c])) & np.uint32(15) for c in range(8)]
    return np.stack(cols, axis=-1).reshape(*w.shape[:-1], -1).astype(np.uint8)


def unpack(words: jax.Array) -> jax.Array:
    """uint32 [..., N/8] → int32 codes [..., N] (jit-friendly)."""
    shifts = jnp.asarray([4 * AWQ_REVERSE[c] for c in range(8)], jnp.uint32)
    codes = (words[..., None] >> shifts) & jnp.uint32(15)
    return codes.reshape(*words.shape[:-1], -1).astype(jnp.int32)


# --- round to nearest --------------------------------------------------------------------------------
def quantize_groups(w_KxN: np.ndarray, spec: QuantSpec, clip: np.ndarray | None = None):
    """Asymmetric RTN of a [..., K, N] matrix, per group of rows → (codes uint8 [..., K, N],
    zeros uint8 [..., K/g, N], scales float16 [..., K/g, N]). The codes are computed with the
    float16-rounded scale, so (code − zero)·scale is exactly what the model computes. `clip`
    ([..., K/g, N] in (0, 1]) shrinks each group's range (AWQ's clipping search)."""
    *lead, K, N = w_KxN.shape
    g = spec.group_size
    w = np.asarray(w_KxN, np.float32).reshape(*lead, K // g, g, N)
    hi, lo = w.max(axis=-2), w.min(axis=-2)
    if clip is not None:
        hi, lo = hi * clip, lo * clip
    hi, lo = np.maximum(hi, 0.0), np.minimum(lo, 0.0)  # the range holds 0 (exact zero weights)
    scale = ((hi - lo) / spec.qmax).astype(np.float16)
    scale = np.where(scale == 0, np.float16(1e-4), scale)  # empty group: any scale, codes all z
    s32 = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s32), 0, spec.qmax)
    codes = np.clip(np.round(w / s32[..., None, :]) + zero[..., None, :], 0, spec.qmax)
    return (codes.reshape(*lead, K, N).astype(np.uint8), zero.astype(np.uint8), scale)


def dequantize_np(codes, zeros, scales, group_size: int, in_scale=None) -> np.ndarray:
    """The float32 matrix [..., K, N] a stored quantized weight stands for."""
    *lead, K, N = codes.shape
    c = codes.astype(np.float32).reshape(*lead, K // group_size, group_size, N)
    w = ((c - zeros.astype(np.float32)[..., None, :]) * scales.astype(np.float32)[..., None, :]).reshape(*lead, K, N)
    return w if in_scale is None else w / np.asarray(in_scale, np.float32)[..., None]


def packed_axes(axes: tuple | None, n_lead: int, n_in: int) -> tuple[tuple, str | None, str | None]:
    """Logical axes of the packed arrays, from the float weight's `axes` (None: experts only):
    (leading axes, the merged input axis, the merged output axis). A merged axis takes the name of
    its first dimension: its contiguous shards are then exactly that dimension's shards (the
    model's trailing merged dims, head_dim, are never sharded), so each device holds the packed
    rows / words of the slice it would hold of the float weight. A packed dimension the mesh axes
    do not divide (a layer with fewer groups than shards, say) is replicated, as `spec_for` does
    for any array."""
    if axes is None:
        return ("expert",) * n_lead, None, None
    return tuple(axes[:n_lead]), axes[n_lead], axes[n_lead + n_in]


class Packed(nnx.Variable):
    """A quantized weight's stored arrays (codes, zeros, scales, input scale): not trainable."""


class QWeight(nnx.Module):
    """A packed weight standing in for an nnx.Param of logical shape `shape`: `w[...]` is the
    dequantized float32 array of that shape (see the module docstring)."""

    def __init__(self, shape: tuple, n_lead: int, n_in: int, spec: QuantSpec, in_scale: bool = False,
                 axes: tuple | None = None):
        lead, K, N = matrix_dims(shape, n_lead, n_in)
        g = spec.group_size
        lead_ax, k_ax, n_ax = packed_axes(axes, n_lead, n_in)
        self.shape, self.group_size = tuple(shape), g
        self.qweight = Packed(jnp.zeros((*lead, K, N // 8), jnp.uint32), logical_axes=lead_ax + (k_ax, n_ax))
        self.qzeros = Packed(jnp.zeros((*lead, K // g, N // 8), jnp.uint32), logical_axes=lead_ax + (k_ax, n_ax))
        self.scales = Packed(jnp.ones((*lead, K // g, N), jnp.float16), logical_axes=lead_ax + (k_ax, n_ax))
        self.in_scale = Packed(jnp.ones((*lead, K), jnp.float32), logical_axes=lead_ax + (k_ax,)) if in_scale else None

    def _dequant(self, qweight, qzeros, scales, in_scale) -> jax.Array:
        *lead, K, _ = qweight.shape
        g = self.group_size
        q = unpack(qweight).reshape(*lead, K // g, g, -1)
        z = unpack(qzeros)[..., None, :]
        w = ((q - z).astype(jnp.float32) * scales.astype(jnp.float32)[..., None, :]).reshape(*lead, K, -1)
        if in_scale is not None:
            w = w / in_scale[..., None]
        return w

    def dequantize(self) -> jax.Array:
        ins = None if self.in_scale is None else self.in_scale[...]
        w = self._dequant(self.qweight[...], self.qzeros[...], self.scales[...], ins)
        return w.reshape(self.shape)

    def __getitem__(self, idx):
        return self.dequantize()[idx]

    def take(self, ids_N: jax.Array) -> jax.Array:
        """The dequantized weights of experts `ids_N` only ([N, ...] of the per-expert shape)."""
        t = lambda a: jnp.take(a, ids_N, axis=0)
        ins = None if self.in_scale is None else t(self.in_scale[...])
        w = self._dequant(t(self.qweight[...]), t(self.qzeros[...]), t(self.scales[...]), ins)
        return w.reshape(ids_N.shape[0], *self.shape[1:])


def take_experts(w, ids_N: jax.Array) -> jax.Array:
    """Rows `ids_N` of a stacked expert weight (a Param or a QWeight)."""
    return w.take(ids_N) if isinstance(w, QWeight) else jnp.take(w[...], ids_N, axis=0)


def quantize_layout(model, spec: QuantSpec) -> None:
    """Replace every quantized linear's Param of `model` (a Llama4) by an empty QWeight of the
    same logical shape, in place (the layout a quantized params directory is read into)."""
    if model.rt.scan_layers:
        raise ValueError("quantized models use the unrolled layout (scan_layers=False)")
    for blk in model.groups.blocks:
        for path, n_lead, n_in, ins in block_targets(blk.is_moe, getattr(blk.ffn, "shared", None) is not None):
            *parents, leaf = path
            owner = blk
            for p in parents:
                owner = getattr(owner, p)
            w = getattr(owner, leaf)
            shape = tuple(w.get_value().shape)
            setattr(owner, leaf, QWeight(shape, n_lead, n_in, spec, ins, w.get_metadata().get("logical_axes")))
    if spec.head and model.lm_head is not None:
        head = model.lm_head
        model.lm_head = QWeight(tuple(head.get_value().shape), 0, 1, spec, axes=head.get_metadata().get("logical_axes"))

"""Activation-aware weight quantization (AWQ, Lin et al. 2023) for the Llama 4 blocks.

For a linear y = x·W whose input channel k carries activations of mean magnitude a_k, AWQ
multiplies W's row k by s_k and divides the activation by s_k: same function in float, but the
salient rows (large a_k) get a finer quantization grid. Per group of linears sharing an input,
s = a^α / sqrt(max·min) with α searched on a grid of `grid` points in [0, 1) minimising the
squared error of the group's outputs after quantization on the calibration activations
(α = 0 is round to nearest, so the search never does worse than RTN there). Optionally each
(group, output column)'s range is then shrunk by the best of the clip ratios 1.0 … 0.55
(minimising that group's partial-output error).

Where the 1/s goes (exactly, in float; the quantized weight is Q(diag(s)·W)):
  - q, k, v: into the attention norm's scale;
  - o: into v's output columns. With GQA one v channel (kv head j, d) feeds o's input channel
    (h, d) of every query head h of group j, so s for o is shared across the group: its
    magnitudes are the group's mean;
  - dense MLP and shared expert gate/up: into the FFN norm's scale. In MoE layers that norm
    also feeds the router and the routed experts, so the router's rows are multiplied by s
    (router stays float32: exact up to rounding) and so are every routed expert's gate/up rows;
  - every down projection (dense, shared, each routed expert): into its own up projection's
    output columns (silu(g)·u is linear in u);
  - routed experts' gate/up: each expert has its own s_e from only the copies routed to it
    (their inputs scaled by the router score, as the sigmoid router feeds them). One norm cannot
    carry E different scales, so s_e stays explicit: QWeight.in_scale = s_e, and the model
    computes x · (Q(diag(s_e)·W_e) / s_e), the activation divided by s_e (model/quant.py).
The search for a later group sees the weights the earlier folds changed (o before q/k/v; down
before gate/up; the shared-expert fold before the per-expert search).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.config import ModelConfig
from ..model.quant import QuantSpec, dequantize_np, quantize_groups
from .calib import BlockTrace, trace_blocks
from .int4 import quantize_flat


@dataclass(frozen=True)
class AWQConfig:
    grid: int = 20  # α = 0, 1/grid, ..., (grid-1)/grid
    clip: bool = True
    clip_ratios: tuple[float, ...] = tuple(1.0 - 0.05 * i for i in range(10))
    max_rows: int = 4096  # calibration rows the scale search uses (a fixed random subset)
    clip_rows: int = 1024


def _qdq(w_KxN: np.ndarray, spec: QuantSpec, clip=None) -> np.ndarray:
    return dequantize_np(*quantize_groups(w_KxN, spec, clip), spec.group_size)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def search_scale(x_TxK: np.ndarray, ws: list[np.ndarray], spec: QuantSpec, grid: int, expand=None,
                 reduce=None) -> np.ndarray:
    """The AWQ input scale [K] for linears `ws` ([K, N_j] each) sharing input x. `reduce` maps
    the [K] magnitudes to the free parameters, `expand` maps those back to [K] (GQA's o)."""
    w = np.concatenate([np.asarray(a, np.float32) for a in ws], axis=1)
    x = np.asarray(x_TxK, np.float32)
    if x.shape[0] == 0:
        return np.ones(w.shape[0], np.float32)
    a = np.abs(x).mean(0)
    a = reduce(a) if reduce else a
    ref = x @ w
    best, best_s = np.inf, np.ones(w.shape[0], np.float32)
    for i in range(grid):
        s = np.maximum(a, 1e-8) ** (i / grid)
        s = np.maximum(s / np.sqrt(s.max() * s.min()), 1e-4).astype(np.float32)
        s = expand(s) if expand else s
        err = float(np.mean((x @ (_qdq(w * s[:, None], spec) / s[:, None]) - ref) ** 2))
        if err < best:
            best, best_s = err, s
    return best_s


def search_clip(x_TxK: np.ndarray, w_KxN: np.ndarray, spec: QuantSpec, ratios) -> np.ndarray:
    """Per (group, output column) range factor [K/g, N] minimising the group's partial-output
    error Σ_t (x_g·(w_g − Q(w_g)))² over the calibration rows."""
    K, N = w_KxN.shape
    g = spec.group_size
    G = K // g
    if x_TxK.shape[0] == 0:
        return np.ones((G, N), np.float32)
    xg = np.asarray(x_TxK, np.float32).reshape(-1, G, g).transpose(1, 0, 2)  # [G, T, g]
    wg = np.asarray(w_KxN, np.float32).reshape(G, g, N)
    ref = xg @ wg  # [G, T, N]: each group's partial outputs (batched BLAS)
    best_err = np.full((G, N), np.inf, np.float32)
    best = np.ones((G, N), np.float32)
    for r in ratios:
        wq = _qdq(w_KxN, spec, np.full((G, N), r, np.float32)).reshape(G, g, N)
        err = np.mean((xg @ wq - ref) ** 2, axis=1)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, np.float32(r), best)
    return best


class _Block:
    """AWQ of one block on the float flat arrays (changed in place): scales folded, in_scales
    and clip factors recorded for `quantize_flat`."""

    def __init__(self, cfg: ModelConfig, layer: int, tr: BlockTrace, flat: dict, spec: QuantSpec,
                 acfg: AWQConfig, rng: np.random.Generator):
        self.cfg, self.p, self.flat, self.spec, self.acfg = cfg, f"groups.blocks.{layer}.", flat, spec, acfg
        self.tr, self.in_scales, self.clips, self.rng = tr, {}, {}, rng
        self.clip_inputs: list[tuple[str, np.ndarray, int | None, np.ndarray]] = []  # name, x, expert, in_scale

    def w(self, name: str) -> np.ndarray:
        return self.flat[self.p + name]

    def set(self, name: str, value) -> None:
        self.flat[self.p + name] = np.asarray(value, np.float32)

    def rows(self, x: np.ndarray, n: int) -> np.ndarray:
        if x.shape[0] <= n:
            return x
        return x[np.sort(self.rng.choice(x.shape[0], n, replace=False))]

    def search(self, x, ws, **kw):
        return search_scale(self.rows(x, self.acfg.max_rows), ws, self.spec, self.acfg.grid, **kw)

    def attention(self) -> None:
        cfg, tr = self.cfg, self.tr
        H, K, Dh, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        G = H // K
        # o: s shared by the G query heads of each kv head; 1/s into v's output columns
        o = self.w("attn.o")
        s_o = self.search(tr.o_in, [o.reshape(H * Dh, D)],
                          reduce=lambda a: a.reshape(K, G, Dh).mean(1).reshape(-1),
                          expand=lambda s: np.repeat(s.reshape(K, 1, Dh), G, axis=1).reshape(-1))
        s_kv = s_o.reshape(K, G, Dh)[:, 0]
        self.set("attn.o", o * s_o.reshape(H, Dh, 1))
        self.set("attn.v", self.w("attn.v") / s_kv[None])
        self.clip_inputs.append(("attn.o", tr.o_in / s_o, None, None))
        # q, k, v: 1/s into the attention norm
        qkv = [self.w(n).reshape(D, -1) for n in ("attn.q", "attn.k", "attn.v")]
        s = self.search(tr.attn_in, qkv)
        for n in ("attn.q", "attn.k", "attn.v"):
            self.set(n, self.w(n) * s[:, None, None])
        self.set("attn_norm.scale", self.w("attn_norm.scale") / s)
        for n in ("attn.q", "attn.k", "attn.v"):
            self.clip_inputs.append((n, tr.attn_in / s, None, None))

    def mlp(self, pre: str, x_in: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """down, then gate/up of one SwiGLU (dense or shared) → the gate/up scale (the caller
        folds it into the norm and whatever else reads the norm)."""
        s_d = self.search(hidden, [self.w(pre + "down")])
        self.set(pre + "up", self.w(pre + "up") / s_d[None, :])
        self.set(pre + "down", self.w(pre + "down") * s_d[:, None])
        s = self.search(x_in, [self.w(pre + "gate"), self.w(pre + "up")])
        self.set(pre + "gate", self.w(pre + "gate") * s[:, None])
        self.set(pre + "up", self.w(pre + "up") * s[:, None])
        self.clip_inputs += [(pre + "down", hidden / s_d, None, None), (pre + "gate", x_in / s, None, None),
                             (pre + "up", x_in / s, None, None)]
        return s

    def dense(self) -> None:
        s = self.mlp("ffn.", self.tr.ffn_in, self.tr.hidden)
        self.set("ffn_norm.scale", self.w("ffn_norm.scale") / s)

    def moe(self) -> None:
        tr, E = self.tr, self.cfg.moe.num_experts
        gate, up, down = (self.w(f"ffn.experts.{n}").copy() for n in ("gate", "up", "down"))
        hid = []
        for e in range(E):  # routed experts' down projections, on their own copies
            x_e = tr.copies[tr.expert_of == e]
            h_e = _silu(x_e @ gate[e]) * (x_e @ up[e])
            s_d = self.search(h_e, [down[e]])
            up[e], down[e] = up[e] / s_d[None, :], down[e] * s_d[:, None]
            hid.append(h_e / s_d)
        s = np.ones(self.cfg.hidden_size, np.float32)
        if self.cfg.moe.shared_expert:  # shared gate/up: into the norm; router and experts compensate
            s = self.mlp("ffn.shared.", tr.ffn_in, tr.hidden)
            self.set("ffn_norm.scale", self.w("ffn_norm.scale") / s)
            self.set("ffn.router", self.w("ffn.router") * s[:, None])
            gate, up = gate * s[None, :, None], up * s[None, :, None]
        ins = np.ones((E, self.cfg.hidden_size), np.float32)
        for e in range(E):  # each expert's gate/up: its own scale, kept explicit (in_scale)
            x_e = tr.copies[tr.expert_of == e] / s
            ins[e] = self.search(x_e, [gate[e], up[e]])
            gate[e], up[e] = gate[e] * ins[e][:, None], up[e] * ins[e][:, None]
            self.clip_inputs += [("ffn.experts.gate", x_e / ins[e], e, None), ("ffn.experts.up", x_e / ins[e], e, None),
                                 ("ffn.experts.down", hid[e], e, None)]
        for n, a in (("gate", gate), ("up", up), ("down", down)):
            self.set(f"ffn.experts.{n}", a)
        self.in_scales[self.p + "ffn.experts.gate"] = ins
        self.in_scales[self.p + "ffn.experts.up"] = ins

    def clip(self) -> None:
        per_expert: dict[str, list] = {}
        for name, x, e, _ in self.clip_inputs:
            w = self.w(name) if e is None else self.w(name)[e]
            K = w.shape[0] if name != "attn.o" else w.shape[0] * w.shape[1]
            c = search_clip(self.rows(x, self.acfg.clip_rows), w.reshape(K, -1), self.spec, self.acfg.clip_ratios)
            if e is None:
                self.clips[self.p + name] = c
            else:
                per_expert.setdefault(name, [None] * self.cfg.moe.num_experts)[e] = c
        for name, cs in per_expert.items():
            self.clips[self.p + name] = np.stack(cs)


def awq_quantize(model, flat: dict, tokens_BxL: np.ndarray, spec: QuantSpec, acfg: AWQConfig = AWQConfig(),
                 seed: int = 0) -> dict:
    """AWQ of an unrolled float model (`model` holds `flat`, which is not changed) on the
    calibration tokens → the quantized flat arrays (model/quant.py layout)."""
    cfg = model.cfg
    out = {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v) for k, v in flat.items()}
    rng = np.random.default_rng(seed)
    in_scales, clips = {}, {}
    for layer, tr in trace_blocks(model, tokens_BxL):
        blk = _Block(cfg, layer, tr, out, spec, acfg, rng)
        blk.attention()
        blk.moe() if cfg.is_moe(layer) else blk.dense()
        if acfg.clip:
            blk.clip()
        in_scales.update(blk.in_scales)
        clips.update(blk.clips)
    return quantize_flat(cfg, out, spec, in_scales, clips)

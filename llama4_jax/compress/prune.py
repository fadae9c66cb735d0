"""Structured pruning: fewer routed experts, narrower FFNs, fewer layers → an ordinary smaller
float model (a valid ModelConfig, trainable with `init_from`, convertible to HF).

All importances come from one pass of the original model over the calibration tokens
(calib.trace_blocks), then the three cuts are applied in order (experts, widths, layers):
  - experts (`--experts N`): per MoE layer, importance_e = Σ over the copies routed to e of the
    norm of e's output = routed load × mean output norm; the N most important are kept in their
    order, with their router columns and selection-bias entries. Dropping expert e is exactly
    routing as if its router logit were −inf;
  - FFN width (`--ffn-keep F`): channel importance = mean |silu(g)·u| over the tokens the FFN
    sees × ‖down row‖ (for a routed expert: over its routed copies). HF's config has one
    `intermediate_size` for routed and shared experts and one `intermediate_size_mlp`, so every
    expert (routed and shared) keeps the same count F·expert_ff and every dense layer F·dense_ff
    (rounded to a multiple of 8, at least 1), each choosing its own channels. Removing a channel
    is exactly zeroing its gate/up columns and down row;
  - layers (`--drop-layers K`): block influence BI_i = 1 − mean_t cos(x_in, x_out); the K lowest
    are dropped, greedily, keeping at least one MoE layer (if there was one), one dense layer (if
    there was one) and one global NoPE layer (if there was one). The kept layers keep their own
    kind (RoPE/NoPE, chunked/global, MoE/dense), written out explicitly (`moe_layers`,
    `no_rope_layers`, `layer_types`), so the pattern is the original's with rows removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model.config import ModelConfig
from .calib import trace_blocks
from .io import CompressError


@dataclass(frozen=True)
class PruneSpec:
    experts: int | None = None
    ffn_keep: float | None = None
    drop_layers: int = 0


def _width(f: int, keep: float) -> int:
    w = int(round(f * keep / 8)) * 8 if f >= 16 else int(round(f * keep))
    return max(1, min(f, w))


def check_prune(cfg: ModelConfig, spec: PruneSpec) -> None:
    if spec.experts is None and spec.ffn_keep is None and not spec.drop_layers:
        raise CompressError("nothing to prune: pass --experts, --ffn-keep and/or --drop-layers")
    if spec.experts is not None:
        E = cfg.moe.num_experts
        if not cfg.moe_layers:
            raise CompressError("--experts: the model has no MoE layers")
        if not cfg.moe.top_k <= spec.experts <= E:
            raise CompressError(f"--experts {spec.experts}: the model has {E} experts per MoE layer "
                                f"(keep between top_k={cfg.moe.top_k} and {E})")
    if spec.ffn_keep is not None and not 0 < spec.ffn_keep <= 1:
        raise CompressError(f"--ffn-keep {spec.ffn_keep}: a fraction in (0, 1]")
    if not 0 <= spec.drop_layers < cfg.num_layers:
        raise CompressError(f"--drop-layers {spec.drop_layers}: the model has {cfg.num_layers} layers")
    if spec.drop_layers and len(choose_dropped(cfg, np.zeros(cfg.num_layers), spec.drop_layers)) < spec.drop_layers:
        raise CompressError(f"--drop-layers {spec.drop_layers}: too many; at least one MoE, one dense and one "
                            "global (NoPE) layer must stay")


def choose_dropped(cfg: ModelConfig, influence: np.ndarray, k: int) -> list[int]:
    """The k least influential layers whose removal leaves each present kind (MoE, dense,
    NoPE global) at least once (fewer if that is impossible)."""
    kinds = {"moe": cfg.is_moe, "dense": lambda i: not cfg.is_moe(i), "nope": lambda i: not cfg.uses_rope(i)}
    need = {n: any(f(i) for i in range(cfg.num_layers)) for n, f in kinds.items()}
    dropped: list[int] = []
    for i in np.argsort(influence, kind="stable"):
        if len(dropped) == k:
            break
        left = [j for j in range(cfg.num_layers) if j not in dropped and j != i]
        if all(not need[n] or any(f(j) for j in left) for n, f in kinds.items()):
            dropped.append(int(i))
    return sorted(dropped)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _channel_importance(h_TxF: np.ndarray, down_FxD: np.ndarray) -> np.ndarray:
    a = np.abs(h_TxF).mean(0) if h_TxF.shape[0] else np.zeros(h_TxF.shape[1], np.float32)
    return a * np.linalg.norm(down_FxD, axis=1)


def importances(model, flat: dict, tokens_BxL: np.ndarray) -> dict:
    """{"experts": {layer: [E]}, "dense": {layer: [F]}, "shared": {layer: [F]},
    "routed": {layer: [E, F]}, "influence": [num_layers]}."""
    cfg = model.cfg
    out = {"experts": {}, "dense": {}, "shared": {}, "routed": {}, "influence": np.zeros(cfg.num_layers)}
    for i, tr in trace_blocks(model, tokens_BxL):
        p = f"groups.blocks.{i}."
        cos = np.sum(tr.x_in * tr.x_out, -1) / (np.linalg.norm(tr.x_in, axis=-1) * np.linalg.norm(tr.x_out, axis=-1) + 1e-12)
        out["influence"][i] = 1.0 - float(np.mean(cos))
        if not cfg.is_moe(i):
            out["dense"][i] = _channel_importance(tr.hidden, flat[p + "ffn.down"])
            continue
        gate, up, down = (np.asarray(flat[p + f"ffn.experts.{n}"], np.float32) for n in ("gate", "up", "down"))
        E = cfg.moe.num_experts
        score, chan = np.zeros(E), np.zeros((E, cfg.moe.expert_ff))
        for e in range(E):
            x = tr.copies[tr.expert_of == e]
            h = _silu(x @ gate[e]) * (x @ up[e])
            score[e] = float(np.linalg.norm(h @ down[e], axis=-1).sum())  # load × mean output norm
            chan[e] = _channel_importance(h, down[e])
        out["experts"][i], out["routed"][i] = score, chan
        if cfg.moe.shared_expert:
            out["shared"][i] = _channel_importance(tr.hidden, flat[p + "ffn.shared.down"])
    return out


def _keep_top(score: np.ndarray, n: int) -> np.ndarray:
    return np.sort(np.argsort(-score, kind="stable")[:n])


def slice_experts(flat: dict, layer: int, keep: np.ndarray) -> None:
    p = f"groups.blocks.{layer}.ffn."
    flat[p + "router"] = flat[p + "router"][:, keep]
    flat[p + "bias"] = flat[p + "bias"][keep]
    for n in ("gate", "up", "down"):
        flat[p + f"experts.{n}"] = flat[p + f"experts.{n}"][keep]


def slice_channels(flat: dict, prefix: str, keep: np.ndarray) -> None:
    """Keep channels `keep` of the SwiGLU at `prefix` (gate/up [..., D, F], down [..., F, D]);
    for routed experts `keep` is [E, F'] (each expert its own channels)."""
    g, u, d = (flat[prefix + n] for n in ("gate", "up", "down"))
    if keep.ndim == 1:
        flat[prefix + "gate"], flat[prefix + "up"], flat[prefix + "down"] = g[:, keep], u[:, keep], d[keep]
    else:
        e = np.arange(keep.shape[0])[:, None]
        flat[prefix + "gate"] = np.transpose(g.transpose(0, 2, 1)[e, keep], (0, 2, 1))
        flat[prefix + "up"] = np.transpose(u.transpose(0, 2, 1)[e, keep], (0, 2, 1))
        flat[prefix + "down"] = d[e, keep]


def drop_layers(cfg: ModelConfig, flat: dict, dropped: list[int]) -> tuple[ModelConfig, dict]:
    kept = [i for i in range(cfg.num_layers) if i not in dropped]
    out = {k: v for k, v in flat.items() if not k.startswith("groups.blocks.")}
    for new, old in enumerate(kept):
        src, dst = f"groups.blocks.{old}.", f"groups.blocks.{new}."
        out.update({dst + k[len(src):]: v for k, v in flat.items() if k.startswith(src)})
    new_cfg = cfg.replace(
        num_layers=len(kept), moe_layers=tuple(n for n, o in enumerate(kept) if cfg.is_moe(o)),
        no_rope_layers=tuple(cfg.no_rope_layers[o] for o in kept),
        layer_types=tuple("chunked_attention" if cfg.is_chunked(o) else "full_attention" for o in kept))
    return new_cfg, out


def prune_model(model, flat: dict, tokens_BxL: np.ndarray, spec: PruneSpec) -> tuple[ModelConfig, dict]:
    """The float model `model` (holding `flat`, unrolled) pruned by `spec` → (config, flat)."""
    cfg = model.cfg
    check_prune(cfg, spec)
    imp = importances(model, flat, tokens_BxL)
    out = {k: np.asarray(v) for k, v in flat.items()}
    moe_kw = {}
    if spec.experts is not None:
        keeps = {i: _keep_top(imp["experts"][i], spec.experts) for i in cfg.moe_layers}
        for i, keep in keeps.items():
            slice_experts(out, i, keep)
            imp["routed"][i] = imp["routed"][i][keep]
        moe_kw["num_experts"] = spec.experts
    new_dense = cfg.dense_ff
    if spec.ffn_keep is not None:
        fe, new_dense = _width(cfg.moe.expert_ff, spec.ffn_keep), _width(cfg.dense_ff, spec.ffn_keep)
        for i in range(cfg.num_layers):
            p = f"groups.blocks.{i}.ffn."
            if cfg.is_moe(i):
                routed = imp["routed"][i]
                slice_channels(out, p + "experts.", np.stack([_keep_top(r, fe) for r in routed]))
                if cfg.moe.shared_expert:
                    slice_channels(out, p + "shared.", _keep_top(imp["shared"][i], fe))
            else:
                slice_channels(out, p, _keep_top(imp["dense"][i], new_dense))
        moe_kw["expert_ff"] = fe
    new_cfg = cfg.replace(moe=moe_kw, dense_ff=new_dense) if moe_kw or new_dense != cfg.dense_ff else cfg
    if spec.drop_layers:
        new_cfg, out = drop_layers(new_cfg, out, choose_dropped(cfg, imp["influence"], spec.drop_layers))
    return new_cfg, out

"""Float flat params → the flat arrays of a quantized model (model/quant.py layout).

`quantize_flat` quantizes every target linear of an unrolled float model by round to nearest,
after AWQ's folding when the caller already applied it (awq.py changes the float weights and
hands per-expert input scales and per-group clipping factors); it returns what
`store.model_from_flat(cfg, flat, rt.replace(quant=spec))` reads and `store.save_params` writes.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..model.config import ModelConfig
from ..model.quant import QuantSpec, block_targets, check_shape, matrix_dims, pack, quantize_groups


class QuantizeError(UserError):
    """A model cannot be quantized as asked (group size, shapes, source)."""


def targets(cfg: ModelConfig, spec: QuantSpec) -> list[tuple[str, int, int, bool]]:
    """(flat name, leading dims, input dims, has in_scale) of every quantized weight."""
    out = []
    for i in range(cfg.num_layers):
        for path, n_lead, n_in, ins in block_targets(cfg.is_moe(i), cfg.moe.shared_expert):
            out.append((f"groups.blocks.{i}." + ".".join(path), n_lead, n_in, ins))
    if spec.head and not cfg.tie_word_embeddings:
        out.append(("lm_head", 0, 1, False))
    return out


def check_model(cfg: ModelConfig, flat: dict, spec: QuantSpec) -> None:
    """Refuse (one line) a model whose weights the spec cannot store."""
    for name, n_lead, n_in, _ in targets(cfg, spec):
        why = check_shape(name, tuple(flat[name].shape), n_lead, n_in, spec)
        if why:
            raise QuantizeError(why)


def quantize_weight(w: np.ndarray, n_lead: int, n_in: int, spec: QuantSpec, clip=None, in_scale=None) -> dict:
    """One float weight (already multiplied by its AWQ input scale, if any) → its stored arrays."""
    lead, K, N = matrix_dims(w.shape, n_lead, n_in)
    codes, zeros, scales = quantize_groups(np.asarray(w, np.float32).reshape(*lead, K, N), spec, clip)
    out = {"qweight": pack(codes), "qzeros": pack(zeros), "scales": scales}
    if in_scale is not None:
        out["in_scale"] = np.asarray(in_scale, np.float32)
    return out


def quantize_flat(cfg: ModelConfig, flat: dict, spec: QuantSpec, in_scales: dict | None = None,
                  clips: dict | None = None) -> dict:
    """Quantize every target of `flat` (unrolled layout). `in_scales`: flat name → [(E,) K]
    input scale the weight was multiplied by (routed experts' gate/up; ones when absent);
    `clips`: flat name → [(E,) K/g, N] range factors."""
    check_model(cfg, flat, spec)
    out = dict(flat)
    for name, n_lead, n_in, has_ins in targets(cfg, spec):
        w = np.asarray(out.pop(name), np.float32)
        ins = None
        if has_ins:
            lead, K, _ = matrix_dims(w.shape, n_lead, n_in)
            ins = (in_scales or {}).get(name, np.ones((*lead, K), np.float32))
        for k, v in quantize_weight(w, n_lead, n_in, spec, (clips or {}).get(name), ins).items():
            out[f"{name}.{k}"] = v
    return out


def param_bytes(flat: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in flat.values()))

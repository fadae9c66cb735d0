"""What the MoE layers' routing statistics become in the logs.

The train step returns them stacked over MoE layers (row r = the r-th MoE layer); every name
written here uses the MODEL's layer index instead (`cfg.moe_layers[r]`), the one a reader finds
in the config and in checkpoints. Per layer L:
  - `moe/layer{L}/<stat>`: max_violation, entropy, aux_loss, z_loss, dropped_frac, ep_overflow_frac;
  - `moe/layer{L}/load/expert{e}`: the fraction of the batch's token copies expert e received
    (scalars: which expert is which survives; the `moe/layer{L}/load` histogram shows the spread);
  - `moe/layer{L}/load_by_source/{source}`: that fraction within the rows of one data source,
    weighted by loss tokens, a list over experts (metrics.jsonl) and, for all sources at once, a
    source × expert heatmap image `moe/layer{L}/load_by_source` (TensorBoard). Only sources with
    tokens in the logged step's batch appear, as for `loss/{source}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .heatmap import heatmap


@dataclass
class MoeLog:
    scalars: dict[str, float | list[float]] = field(default_factory=dict)  # metrics.jsonl (+ TB scalars)
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # uint8 [H, W, 3]


def moe_log(metrics: dict, moe_layers: tuple[int, ...], source_names: tuple[str, ...],
            src_tokens_S: np.ndarray) -> MoeLog:
    """`metrics`: the host copy of one train step's metrics (keys `moe/<stat>`, stacked over MoE
    layers); `src_tokens_S`: that step's loss tokens per source (which sources were present)."""
    out = MoeLog()
    present = [i for i, n in enumerate(source_names) if src_tokens_S[i] > 0]
    for key, v in metrics.items():
        if not key.startswith("moe/"):
            continue
        name = key[len("moe/"):]
        for layer, val in zip(moe_layers, np.asarray(v)):
            prefix = f"moe/layer{layer}"
            if name == "load":
                out.histograms[f"{prefix}/load"] = val
                out.scalars.update({f"{prefix}/load/expert{e}": float(x) for e, x in enumerate(val)})
            elif name == "load_by_source":
                out.scalars.update({f"{prefix}/load_by_source/{source_names[i]}": [float(x) for x in val[i]]
                                    for i in present})
                if present:
                    out.images[f"{prefix}/load_by_source"] = heatmap(val[present], [source_names[i] for i in present])
            else:
                out.scalars[f"{prefix}/{name}"] = float(val)
    return out

"""Reading a Hugging Face checkpoint straight onto a mesh: each device's slice of each tensor.

`read_hf_sharded(hf_dir, rt, shardings)` builds every variable with
`jax.make_array_from_callback`: for each device this process holds, the callback maps the
device's index into our layout (transposed, head-split, gate/up halves of the fused expert
tensor, stacked scan groups) back to the HF tensor's index and reads only that block with
safetensors' `get_slice`. No process ever reads a whole tensor it does not hold, and no device
ever holds more than its shard — what a 400B-parameter checkpoint needs.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from ..errors import ConvertError
from ..model.config import ModelConfig, RuntimeConfig
from ..model.store import flat_name, state_shapes
from .hf import SafetensorsReader, config_from_hf, hf_key, hf_shape, read_hf_config, tensor_map


def _norm(index: tuple, shape: tuple) -> list[slice]:
    """A device index (slices, possibly open) as explicit step-1 slices of `shape`."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return [slice(*s.indices(n)[:2]) for s, n in zip(index, shape)]


def _span(s: slice) -> int:
    return s.stop - s.start


def hf_block(read, conv: str, idx: list[slice], ours: tuple) -> np.ndarray:
    """Our block `idx` (of a tensor of our shape `ours`) from the HF tensor, reading only the HF
    block that holds it. `read(hf_index)` returns that block of the HF tensor."""
    if conv == "id":
        return read(tuple(idx))
    if conv == "T":
        a, b = idx
        return read((b, a)).T
    if conv == "in_heads":  # ours [D, N, Dh] = HF [N·Dh, D]ᵀ
        d, n, h = idx
        Dh = ours[2]
        x = read((slice(n.start * Dh, n.stop * Dh), d)).T
        return x.reshape(_span(d), _span(n), Dh)[:, :, h]
    if conv == "out_heads":  # ours [H, Dh, D] = HF [D, H·Dh]ᵀ
        n, h, d = idx
        Dh = ours[1]
        x = read((d, slice(n.start * Dh, n.stop * Dh))).T
        return x.reshape(_span(n), Dh, _span(d))[:, h, :]
    if conv == "flat":  # ours [N, Dh] = HF [N·Dh]
        n, h = idx
        Dh = ours[1]
        return read((slice(n.start * Dh, n.stop * Dh),)).reshape(_span(n), Dh)[:, h]
    if conv in ("gate", "up"):  # HF [E, D, 2F]: gate the first half, up the second
        e, d, f = idx
        off = 0 if conv == "gate" else ours[2]
        return read((e, d, slice(f.start + off, f.stop + off)))
    raise ValueError(f"unknown conversion {conv!r}")


def read_hf_sharded(hf_dir: Path, rt: RuntimeConfig, shardings: dict) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """HF directory → (our config, flat name → jax.Array on `shardings[name]`), in `rt`'s layout
    and parameter dtype. Shapes are checked from the files' headers before anything is read."""
    hf_dir = Path(hf_dir)
    cfg, prefix = config_from_hf(read_hf_config(hf_dir), hf_dir / "config.json")
    reader = SafetensorsReader(hf_dir)
    shapes = state_shapes(cfg, rt)
    sources: dict[str, dict[int | None, tuple[str, str]]] = {}
    for hf_name, path, conv, layer in tensor_map(cfg):
        slot, group = (path, None) if layer is None else cfg.layer_slot(layer, rt.scan_layers)
        name = flat_name(path if layer is None else slot + path)
        spec = shapes[name]
        want = tuple(spec.shape[1:] if group is not None else spec.shape)
        key = hf_key(prefix, hf_name)
        got = reader.shape(key)
        if got != hf_shape(conv, want):
            raise ConvertError(f"tensor {key}: shape {got}, expected {hf_shape(conv, want)} for this config.json")
        sources.setdefault(name, {})[group] = (key, conv)
    out = {}
    for name, spec in shapes.items():
        out[name] = jax.make_array_from_callback(tuple(spec.shape), shardings[name],
                                                 _callback(reader, sources.get(name), spec))
    return cfg, out


def _callback(reader: SafetensorsReader, source: dict | None, spec):
    dtype, shape = np.dtype(spec.dtype), tuple(spec.shape)
    if source is None:  # not in the HF file (the router bias): starts at zero
        return lambda index: np.zeros([_span(s) for s in _norm(index, shape)], dtype)
    stacked = None not in source

    def one(key, conv, idx, ours):
        return np.asarray(hf_block(lambda i: reader.get_slice(key, i), conv, idx, ours))

    def cb(index):
        idx = _norm(index, shape)
        if not stacked:
            key, conv = source[None]
            return one(key, conv, idx, shape).astype(dtype)
        groups = range(idx[0].start, idx[0].stop)
        return np.stack([one(*source[g], idx[1:], shape[1:]) for g in groups]).astype(dtype)

    return cb

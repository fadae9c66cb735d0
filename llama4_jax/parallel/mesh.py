"""Meshes: building them (real or abstract), checking a model and a batch fit them, and the
bytes a sharded pytree puts on one device."""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from ..errors import MeshError
from .rules import MESH_AXES, _axis_sizes, axes_of, zigzag_order

# Model dimensions the mesh must divide (else a MeshError before anything runs): sharding them is
# the point of their axis, and silently replicating e.g. the experts would multiply memory.
# Every other dimension that its axes do not divide is replicated (`spec_for`); for `kv_heads`
# (8 KV heads on tensor=16) and `vocab` (202048 is not a power of two) that is the usual choice.
MUST_DIVIDE = ("embed", "heads", "mlp", "expert", "expert_mlp")
_DIM_NAMES = {"embed": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads", "mlp": "dense_ff",
              "expert": "moe.num_experts", "expert_mlp": "moe.expert_ff", "vocab": "vocab_size"}


# --- meshes ---------------------------------------------------------------------------------
def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh {dict(sizes)} needs {math.prod(shape)} devices, {len(devices)} available")
    if devices[0].platform == "tpu":
        # Follows the physical torus so neighbouring mesh coordinates are neighbouring chips.
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:  # jax.devices() is process-major: a process's devices form one block of the batch axes
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    """A mesh of any size without devices: for planning shardings and memory (`--dry-run`)."""
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


# --- model fit ------------------------------------------------------------------------------
def model_dims(cfg) -> dict[str, int]:
    """Logical axis → size, for the axes whose divisibility matters (a ModelConfig)."""
    return {"embed": cfg.hidden_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
            "mlp": cfg.dense_ff, "expert": cfg.moe.num_experts, "expert_mlp": cfg.moe.expert_ff,
            "vocab": cfg.vocab_size}


def _shards(name: str, sizes: Mapping[str, int], rules: Mapping) -> tuple[int, str]:
    axes = [a for a in axes_of(rules.get(name)) if sizes.get(a, 1) > 1]
    return math.prod(sizes[a] for a in axes), "×".join(f"{a}={sizes[a]}" for a in axes)


def check_fit(dims: Mapping[str, int], sizes: Mapping[str, int], rules: Mapping) -> list[str]:
    """Raise MeshError if a MUST_DIVIDE dimension is not divisible by its mesh axes; return
    notes on the other dimensions that will be replicated instead of sharded."""
    notes = []
    for name, dim in dims.items():
        n, how = _shards(name, sizes, rules)
        if n > 1 and dim % n:
            field = _DIM_NAMES.get(name, name)
            if name in MUST_DIVIDE:
                raise MeshError(f"mesh {how} does not divide {field}={dim} (logical axis {name!r}; "
                                f"change the mesh or mesh.rules.{name})")
            notes.append(f"{field}={dim} is not divisible by {how}: logical axis {name!r} is replicated")
    return notes


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs under `shardings` (same structure)."""
    total = 0
    for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        total += math.prod(s.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
    return total


def total_bytes(abstract_tree) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract_tree))


def format_bytes(n: float) -> str:
    """The largest binary unit that keeps the number >= 1, about 3 significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            digits = 0 if unit == "B" or abs(n) >= 100 else 1 if abs(n) >= 10 else 2
            return f"{n:.{digits}f} {unit}"
        n /= 1024


# --- batches --------------------------------------------------------------------------------
def batch_sharding(mesh: Mesh, rules: Mapping) -> NamedSharding:
    """The sharding of the batch's [B, L] fields: rows over the `batch` rule's axes and, under
    context parallelism, columns over the `length` rule's (a [B] field takes the first entry:
    `for_rank`)."""
    axes = tuple(a for a in axes_of(rules.get("batch")) if mesh.shape[a] > 1)
    length = tuple(a for a in axes_of(rules.get("length")) if mesh.shape[a] > 1 and a not in axes)
    spec = [axes if axes else None] + ([length[0] if len(length) == 1 else length] if length else [])
    return NamedSharding(mesh, P(*spec))


def for_rank(sharding: NamedSharding, ndim: int) -> NamedSharding:
    """`sharding` cut to an array of `ndim` dimensions (the batch's [B] fields); fields of rank
    above 2 (image tiles [B, K, C, S, S], audio clips [B, K, S]) split over the batch axes only."""
    spec = tuple(sharding.spec)[:ndim if ndim <= 2 else 1]
    return NamedSharding(sharding.mesh, P(*spec))


def context_shards(sharding: NamedSharding) -> int:
    """How many ways `batch_sharding` splits the sequence (1: no context parallelism)."""
    spec = tuple(sharding.spec)
    if len(spec) < 2 or spec[1] is None:
        return 1
    return math.prod(sharding.mesh.shape[a] for a in axes_of(spec[1]))


def batch_shardings(sharding: NamedSharding, ranks: Mapping[str, int]) -> dict:
    """Per-field shardings of a batch whose fields have the given ranks (jit's in_shardings)."""
    return {k: for_rank(sharding, r) for k, r in ranks.items()}


def batch_divisor(mesh, rules: Mapping) -> int:
    """How many ways the global batch is split (the batch size must be a multiple)."""
    sizes = _axis_sizes(mesh)
    return math.prod(sizes[a] for a in axes_of(rules.get("batch")))


def check_batch_layout(mesh: Mesh, rules: Mapping) -> None:
    """Each process feeds its own rows (data/pipeline.py), so no batch shard may live on two
    processes: an axis that replicates the batch (tensor, or one dropped from `rules.batch`) must
    stay inside a process."""
    n = batch_divisor(mesh, rules)
    index = for_rank(batch_sharding(mesh, rules), 1).devices_indices_map((n,))
    owner: dict[tuple, int] = {}
    for dev, idx in index.items():
        key = (idx[0].start, idx[0].stop)
        if owner.setdefault(key, dev.process_index) != dev.process_index:
            replicated = [a for a in MESH_AXES if a not in axes_of(rules.get("batch")) and mesh.shape[a] > 1]
            raise MeshError(f"batch shard {key[0]}:{key[1]} is replicated on processes {owner[key]} and "
                            f"{dev.process_index}: the batch-replicating axes {replicated} must fit inside one "
                            f"process's {jax.local_device_count()} devices")


def to_context_layout(local: dict, n: int) -> dict:
    """The [B, L] fields of a batch in the zig-zag order of n context shards (rules.zigzag_order);
    positions and segment ids were computed in the natural order, so they travel with their tokens."""
    if n == 1:
        return dict(local)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        out[k] = v[:, zigzag_order(v.shape[1], n)] if v.ndim == 2 else v
    return out


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """This process's rows → global arrays: rows over the batch axes, and, under context
    parallelism, each [B, L] field in the zig-zag order with its columns split over the context
    axis (`to_context_layout`)."""
    local = to_context_layout(local, context_shards(sharding))
    return {k: jax.make_array_from_process_local_data(for_rank(sharding, np.ndim(v)), v) for k, v in local.items()}

"""Meshes and the one table of logical axis → mesh axis rules.

Parameters declare logical axis names where they are created (model/layers.py `param`); this
module is the only place that knows how those names map onto the mesh axes
`data`, `fsdp`, `expert`, `tensor`. Optimizer state mirrors its parameter's sharding.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis → mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # activations: every axis not busy with weights splits the batch
    "embed": "fsdp",  # FSDP: parameters and optimizer state sharded over fsdp
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "router": None,
    "norm": None,
    "layers": None,
}


class MeshError(ValueError):
    """The mesh cannot be built for these devices / this model (one line)."""


def merged_rules(overrides: Mapping | None = None) -> dict:
    rules = dict(DEFAULT_RULES)
    for k, v in (overrides or {}).items():
        rules[k] = tuple(v) if isinstance(v, list) else v
    return rules


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise MeshError(f"mesh {dict(sizes)} needs {math.prod(shape)} devices, {len(devices)} available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def spec_for(shape: tuple, axes: tuple, mesh: Mesh, rules: Mapping) -> P:
    """PartitionSpec for an array with logical `axes`; a dimension that the mesh axes do not
    divide is replicated rather than failing (e.g. 2 KV heads on tensor=4)."""
    if len(axes) == len(shape) - 1:  # stacked by scan-over-layers
        axes = ("layers", *axes)
    used, out = set(), []
    for dim, name in zip(shape, axes):
        mesh_axes = tuple(a for a in _mesh_axes(rules.get(name)) if a not in used and mesh.shape[a] > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            out.append(None)
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh: Mesh, rules: Mapping):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments, state)."""

    def one(x):
        if _is_var(x):
            axes = x.get_metadata().get("logical_axes")
            value = x.get_value()
            spec = spec_for(tuple(value.shape), tuple(axes), mesh, rules) if axes else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, rules: Mapping) -> NamedSharding:
    axes = tuple(a for a in _mesh_axes(rules.get("batch")) if mesh.shape[a] > 1)
    return NamedSharding(mesh, P(axes if axes else None))


def batch_divisor(mesh: Mesh, rules: Mapping) -> int:
    return math.prod(mesh.shape[a] for a in _mesh_axes(rules.get("batch")))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """This process's rows → global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}

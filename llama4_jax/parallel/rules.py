"""The one table of logical axis → mesh axis rules, and sharding from logical names.

Parameters declare logical axis names where they are created (model/layers.py `param`), and the
model marks a few activations with `constrain(x, logical_axes)`; this module is the only place
that knows how those names map onto the mesh axes `data`, `fsdp`, `expert`, `context`, `tensor`.
Optimizer state mirrors its parameter's sharding (the moments carry the same metadata).

The same rules give parameter, optimizer-state and activation shardings. Within one array a mesh
axis is used at most once, first come first served: for an activation (batch, length, embed) the
batch takes data×fsdp×expert, `length` takes context, so `embed` (fsdp for weights) stays whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

# Logical axis → mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # activations: every axis not busy with weights splits the batch
    "length": "context",  # context parallelism: the sequence split over devices (model/context_parallel.py)
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

def merged_rules(overrides: Mapping | None = None) -> dict:
    rules = dict(DEFAULT_RULES)
    for k, v in (overrides or {}).items():
        rules[k] = tuple(v) if isinstance(v, list) else v
    return rules


def axes_of(rule) -> tuple[str, ...]:
    """A rule value or PartitionSpec entry (None, an axis, a tuple of axes) as a tuple of axes."""
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def _axis_sizes(mesh_or_sizes) -> Mapping[str, int]:
    return mesh_or_sizes if isinstance(mesh_or_sizes, Mapping) else mesh_or_sizes.shape


def spec_for(shape: tuple, axes: tuple, mesh, rules: Mapping) -> P:
    """PartitionSpec for an array with logical `axes` on `mesh` (a Mesh, AbstractMesh or axis
    sizes); a dimension that its mesh axes do not divide is replicated rather than failing."""
    sizes = _axis_sizes(mesh)
    if len(axes) == len(shape) - 1:  # stacked by scan-over-layers
        axes = ("layers", *axes)
    used, out = set(), []
    for dim, name in zip(shape, axes):
        mesh_axes = tuple(a for a in axes_of(rules.get(name)) if a not in used and sizes.get(a, 1) > 1)
        if mesh_axes and dim % math.prod(sizes[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            out.append(None)
    return P(*out)


# --- pytrees of Variables -------------------------------------------------------------------
def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh, rules: Mapping):
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments, state).
    `mesh` may be an AbstractMesh (planning without devices)."""

    def one(x):
        if _is_var(x):
            axes = x.get_metadata().get("logical_axes")
            value = x.get_value()
            spec = spec_for(tuple(value.shape), tuple(axes), mesh, rules) if axes else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=_is_var)


# --- activations ----------------------------------------------------------------------------
_RULES: contextvars.ContextVar[Mapping] = contextvars.ContextVar("llama4_jax_rules", default=DEFAULT_RULES)


def set_rules(rules: Mapping) -> contextvars.Token:
    """Make `rules` the table `constrain` uses (the runner sets the experiment's rules once)."""
    return _RULES.set(dict(rules))


@contextlib.contextmanager
def logical_rules(rules: Mapping):
    token = set_rules(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


def active_mesh():
    """The ambient mesh (`jax.set_mesh`) when sharding applies to it, else None: no mesh, one
    device, or inside a shard_map's manual region."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 or mesh.manual_axes else mesh


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint from logical axis names, against the ambient mesh (`jax.set_mesh`).
    The model calls this without knowing the mesh: with none set (or one device, or inside a
    shard_map's manual region) it returns `x` unchanged."""
    mesh = active_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(tuple(x.shape), tuple(axes), mesh, _RULES.get()))


def rule_axes(rules: Mapping, logical: str) -> tuple[str, ...]:
    """The mesh axes a logical axis maps to under `rules` (empty: replicated)."""
    return axes_of(rules.get(logical))


def split_axes_of(mesh, logical: tuple[str, ...], rules: Mapping | None = None) -> tuple[str, ...]:
    """The mesh axes of size > 1 that the `logical` names map to, in the rules' order, each once:
    what splits a dimension laid out as those names flattened (("batch", "length") for [B·L])."""
    rules = current_rules() if rules is None else rules
    out: list[str] = []
    for name in logical:
        out += [a for a in axes_of(rules.get(name)) if a in mesh.axis_names and mesh.shape[a] > 1 and a not in out]
    return tuple(out)


def current_rules() -> Mapping:
    """The table `constrain` uses now (the runner sets the experiment's rules once)."""
    return _RULES.get()


# --- the sequence layout under context parallelism -----------------------------------------
def zigzag_order(L: int, n: int) -> np.ndarray:
    """The zig-zag layout of a row split over n context shards, as a permutation: `x[:, perm]`
    puts original row perm[p] at position p. The row is cut into 2n pieces of L/(2n) and shard r
    holds pieces r and 2n−1−r (so every shard has as much causal work: model/context_parallel.py)."""
    if L % (2 * n):
        raise ValueError(f"sequence length {L} is not a multiple of 2 × {n} context shards")
    c = L // (2 * n)
    pieces = np.arange(L).reshape(2 * n, c)
    return np.concatenate([np.concatenate([pieces[r], pieces[2 * n - 1 - r]]) for r in range(n)])

"""The [V, D] tables without a whole copy per device: the embedding lookup and the axes the
vocab-parallel head (train/loss.py) splits over.

Under FSDP the embedding table [V, D] and the lm head [D, V] are sharded along D (`embed` →
fsdp, and more axes if the rules say so). The plain lookup `table[ids]` makes XLA gather the
whole table onto every device (and scatter-add its gradient into a whole float32 [V, D]): at
Llama 4's V = 202,048 and D = 5,120 that is 3.9 GiB per copy, per device.

`embed_lookup` keeps the table where it is. Inside one shard_map, each device
  1. gathers the token ids (int32, small) of the devices that share its batch shard group along
     the table's D axes `G`;
  2. looks up its own D-slice of the table for all of those ids → [B·|G|, L, D/|G|];
  3. exchanges slices with one all-to-all so each device holds the whole D of its own rows.
The backward pass (autodiff of the same program) runs the all-to-all backwards and scatter-adds
into the local [V, D/|G|] slice only. Same numbers as `table[ids]` (a lookup moves values
exactly). A table whose V dim is also split (the `vocab` rule, e.g. `tensor`) looks up the
local V range with the others masked to zero and sums over those axes.

`split_axes(...)` says whether this applies: G must be mesh axes that also split the batch,
so that gathering ids over G collects other devices' rows (an axis that does not split the
batch would gather copies). Otherwise — no mesh, one device, inside another shard_map, or a
layout this does not cover — the plain lookup runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ..parallel.rules import active_mesh, axes_of as _axes, current_rules, spec_for, split_axes_of


def row_axes(mesh, n_rows: int, logical=("batch",)) -> tuple[str, ...] | None:
    """The mesh axes that split `n_rows` rows laid out as the `logical` names (("batch",
    "length") for [B·L] flattened tokens), or None if they do not divide it."""
    axes = split_axes_of(mesh, logical)
    return None if n_rows % math.prod(mesh.shape[a] for a in axes) else axes


def split_axes(mesh, table_shape, table_axes, rows: tuple[str, ...]):
    """→ (D axes G, V axes) of a vocab table with logical `table_axes` (one "embed", one "vocab")
    used by rows split over the mesh axes `rows`, or None when the plain computation should run
    (see the module docstring)."""
    t_spec = spec_for(tuple(table_shape), tuple(table_axes), mesh, current_rules())
    d_axes = _axes(t_spec[table_axes.index("embed")])
    v_axes = _axes(t_spec[table_axes.index("vocab")])
    if not d_axes or not set(d_axes) <= set(rows) or set(v_axes) & set(rows):
        return None
    return d_axes, v_axes


def embed_lookup(table_VxD: jax.Array, ids_BxL: jax.Array, dtype) -> jax.Array:
    """table[ids] in `dtype` → [B, L, D], without gathering the table (module docstring)."""
    mesh = active_mesh()
    plan = None
    if mesh is not None:
        r_spec = spec_for(tuple(ids_BxL.shape), ("batch", "length"), mesh, current_rules())
        ctx = set(_axes(r_spec[1]))
        plan = split_axes(mesh, table_VxD.shape, ("vocab", "embed"), _axes(r_spec[0]))
        if plan is not None and set(plan[1]) & ctx:
            plan = None
    if plan is None:
        return jnp.take(table_VxD, ids_BxL, axis=0).astype(dtype)
    g_axes, v_axes = plan
    V_l = table_VxD.shape[0] // math.prod(mesh.shape[a] for a in v_axes)

    def body(table_l, ids_l):
        ids_g = jax.lax.all_gather(ids_l, g_axes, axis=0, tiled=True)
        if v_axes:
            local = ids_g - jax.lax.axis_index(v_axes) * V_l
            inside = (local >= 0) & (local < V_l)
            x = jnp.take(table_l, jnp.clip(local, 0, V_l - 1), axis=0)
            x = jax.lax.psum(jnp.where(inside[..., None], x, 0), v_axes)
        else:
            x = jnp.take(table_l, ids_g, axis=0)
        # rows of every device in G, my D-slice → my rows, every D-slice
        return jax.lax.all_to_all(x.astype(dtype), g_axes, 0, x.ndim - 1, tiled=True)

    t_spec = P(v_axes or None, g_axes)
    out_spec = P(*r_spec, None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(t_spec, r_spec), out_specs=out_spec)
    return fn(table_VxD, ids_BxL)

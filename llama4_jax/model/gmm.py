"""Grouped matmul: rows of x sorted by group, group e (the next sizes_E[e] rows) times w[e].

    gmm(x_NxD, w_ExDxF, sizes_E)  → y_NxF,  y[rows of group e] = x[rows of group e] @ w[e]
    tgmm(x_NxD, dy_NxF, sizes_E)  → dw_ExDxF, dw[e] = x_eᵀ · dy_e   (the weight gradient)

Rows past sum(sizes_E) belong to no group: their output is 0 and they add nothing to dw (the
expert-parallel path parks its empty receive slots there). `gmm` has a custom VJP built from the
same two kernels (dx = gmm(dy, wᵀ), dw = tgmm(x, dy)), so it is differentiable in x and w.

`grouped_swiglu` is the expert MLP on top of them (what the MoE block calls), fused on CPU.

Backends (chosen by `jax.default_backend()` at trace time, or by `impl=`):
  - `ragged` (GPU/TPU): `jax.lax.ragged_dot` (and `ragged_dot_general` for the weight gradient),
    which XLA lowers to real grouped kernels there.
  - `tiles` (CPU): XLA:CPU lowers ragged_dot to a product against every expert, E times the
    useful work (measured: the E=64 block fwd+bwd takes 11 s, 78× a dense MLP). Instead a
    `fori_loop` walks the experts and covers each group with power-of-two row tiles, largest
    first, down to 8 rows: a group of n rows costs ⌈n/8⌉·8 rows of matmul, so the product costs
    ≤ N + 7E rows whatever the routing — no capacity, nothing dropped, no dependence on balance.
    The number of tiles of each size is a data-dependent trip count of an inner `fori_loop`.
    `grouped_swiglu` fuses gate, up, silu·mul and down (and, backward, all six products) into
    one expert loop so a tile is used while it is in cache, reads each expert's weights once per
    pass, and accumulates each expert's weight gradient in a [D, F] carry written once.
  Why not the first design considered, per-expert padded buffers of a static capacity c run in
  rounds until every row is done: a round costs E·c rows whatever the load, and with the routing
  of early training the largest group is ~2× the mean (68 copies for a mean of 32 at E=128), so
  dropless needs 2-3 rounds of c ≈ mean, or one round of c = max group. Even that best case
  measured 2.4× a dense MLP for the expert MLP alone at E=64, top-1, against 1.6× for the tiles.
  Measured (tools/bench_moe.py, BENCHMARKS.md "MoE block", 2-core CPU, one thread): block
  fwd+bwd ÷ dense SwiGLU of equal active FLOPs = 1.08-1.31 at E = 8-16, 1.31-1.72 at E = 64,
  1.54-2.04 at E = 128. The growth with E is the experts' weights, not rows: each expert's
  1.5 MiB of weights is read (and repacked by the matmul library) for forward and dx, and its
  gradient written, for only ~32 rows at E = 128, which makes the small products run at
  ~64 GFLOP/s against ~87 for a dense one.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

MIN_TILE = 8  # row granularity: a group of n rows costs ⌈n/8⌉·8 rows of matmul


def tile_classes(max_tile: int) -> tuple[int, ...]:
    """Tile heights, largest first: max_tile, max_tile/2, ..., MIN_TILE (max_tile a power of 2)."""
    assert max_tile >= MIN_TILE and max_tile & (max_tile - 1) == 0, max_tile
    out, s = [], max_tile
    while s >= MIN_TILE:
        out.append(s)
        s //= 2
    return tuple(out)


def _varying_axes(a) -> frozenset:
    """Mesh axes over which `a` varies inside a shard_map (empty outside one)."""
    t = jax.typeof(a)
    mat = getattr(t, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def vzeros(shape, dtype, *like) -> jax.Array:
    """Zeros typed as varying over every manual mesh axis any of `like` varies over, so loop
    carries keep one type inside shard_map (the expert-parallel path runs these loops there)."""
    z = jnp.zeros(shape, dtype)
    axes = frozenset().union(*(_varying_axes(a) for a in like))
    return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def match_varying(*arrays):
    """Cast every array to vary over the union of their manual axes. Called before a custom_vjp:
    its backward must return cotangents typed like its inputs, and a weight that is invariant over
    `data` (replicated) but used with `data`-varying tokens needs the psum that autodiff of this
    cast (pvary → psum) inserts outside the custom rule."""
    axes = frozenset().union(*(_varying_axes(a) for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - _varying_axes(a)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def _padded(n):
    return (n + MIN_TILE - 1) // MIN_TILE * MIN_TILE


def _expert_tiles(start, size, classes, tile_fn, carry):
    """Run tile_fn(s, row0, valid, carry) over tiles covering rows [start, start+⌈size/8⌉·8).

    Tiles go largest first; `valid` = how many of the tile's s rows belong to this group (only
    the last tile is partial). A tile of class s exists for bit s of the padded size.
    """
    big = classes[0]
    p = _padded(size)
    n_big = p // big
    carry = jax.lax.fori_loop(
        0, n_big, lambda i, c: tile_fn(big, start + i * big, jnp.minimum(size - i * big, big), c), carry)
    off = n_big * big
    for s in classes[1:]:
        has = (p // s) % 2
        # The tile's row depends on i (always 0) so XLA cannot hoist its matmul out of the
        # 0-or-1 trip loop as loop-invariant code (it would then run for absent tiles too).
        carry = jax.lax.fori_loop(
            0, has, lambda i, c, s=s, off=off: tile_fn(s, start + off + i * s, size - off - i * s, c), carry)
        off = off + has * s
    return carry


def _starts(sizes_E):
    return jnp.cumsum(sizes_E) - sizes_E


def _rows(a_NxD, row0, s):
    return jax.lax.dynamic_slice_in_dim(a_NxD, row0, s, axis=0)


def _gmm_tiles(x_NxD, w_ExAxB, sizes_E, transpose_w: bool, max_tile: int, out_dtype):
    """y[group e] = x[group e] @ w[e] (or @ w[e]ᵀ). x's rows are padded so no tile reads past the end."""
    N, D = x_NxD.shape
    classes = tile_classes(max_tile)
    F = w_ExAxB.shape[1] if transpose_w else w_ExAxB.shape[2]
    x_pad = jnp.pad(x_NxD, ((0, MIN_TILE), (0, 0)))
    starts_E = _starts(sizes_E)
    w_dims = (2,) if transpose_w else (1,)

    def per_expert(e, y_pad):
        w_e = jax.lax.dynamic_index_in_dim(w_ExAxB, e, axis=0, keepdims=False)

        def tile(s, row0, valid, y):
            y_t = jax.lax.dot_general(_rows(x_pad, row0, s), w_e, (((1,), (w_dims[0] - 1,)), ((), ())),
                                      preferred_element_type=jnp.float32).astype(out_dtype)
            keep = (jnp.arange(s) < valid)[:, None]
            y_t = jnp.where(keep, y_t, _rows(y, row0, s))  # rows past the group belong to the next one
            return jax.lax.dynamic_update_slice_in_dim(y, y_t, row0, axis=0)

        return _expert_tiles(starts_E[e], sizes_E[e], classes, tile, y_pad)

    init = vzeros((N + MIN_TILE, F), out_dtype, x_NxD, w_ExAxB, sizes_E)
    y_pad = jax.lax.fori_loop(0, w_ExAxB.shape[0], per_expert, init)
    return y_pad[:N]


def _tgmm_tiles(x_NxD, dy_NxF, sizes_E, num_groups: int, max_tile: int, out_dtype):
    """dw[e] = x[group e]ᵀ @ dy[group e]; each expert's [D, F] accumulates in f32 and is written once."""
    N, D = x_NxD.shape
    F = dy_NxF.shape[1]
    classes = tile_classes(max_tile)
    x_pad = jnp.pad(x_NxD, ((0, MIN_TILE), (0, 0)))
    dy_pad = jnp.pad(dy_NxF, ((0, MIN_TILE), (0, 0)))
    starts_E = _starts(sizes_E)

    def per_expert(e, dw_ExDxF):
        def tile(s, row0, valid, acc_DxF):
            keep = (jnp.arange(s) < valid)[:, None]
            x_t = jnp.where(keep, _rows(x_pad, row0, s), 0)
            return acc_DxF + jax.lax.dot_general(x_t, _rows(dy_pad, row0, s), (((0,), (0,)), ((), ())),
                                                 preferred_element_type=jnp.float32)

        acc = _expert_tiles(starts_E[e], sizes_E[e], classes, tile, vzeros((D, F), jnp.float32, x_NxD, dy_NxF, sizes_E))
        return jax.lax.dynamic_update_index_in_dim(dw_ExDxF, acc.astype(out_dtype), e, axis=0)

    return jax.lax.fori_loop(0, num_groups, per_expert, vzeros((num_groups, D, F), out_dtype, x_NxD, dy_NxF, sizes_E))


def _tgmm_ragged(x_NxD, dy_NxF, sizes_E, num_groups: int, out_dtype):
    # ragged_dot_general with a ragged contracting dim is the weight gradient of ragged_dot.
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    rows = jnp.arange(x_NxD.shape[0])
    x_NxD = jnp.where((rows < jnp.sum(sizes_E))[:, None], x_NxD, 0)
    return jax.lax.ragged_dot_general(x_NxD, dy_NxF, sizes_E, dims,
                                      preferred_element_type=jnp.float32).astype(out_dtype)


# --- fused expert SwiGLU (CPU tiles) ---------------------------------------------------------
# One loop over experts does gate|up, silu·mul and down for each row tile while the tile is in
# cache, instead of three gmm loops (and six in the backward pass). Tiles run in increasing row
# order, so a tile's overhang rows (past its group) are rewritten by the next group's first tile;
# rows past sum(sizes) are zeroed at the end.
def _live_rows(a_NxD, total):
    return jnp.where((jnp.arange(a_NxD.shape[0]) < total)[:, None], a_NxD, 0)


def _swiglu_tiles_fwd(x_NxD, wg_ExDxF, wu_ExDxF, wd_ExFxD, sizes_E, max_tile):
    N, D = x_NxD.shape
    F, dt = wg_ExDxF.shape[2], x_NxD.dtype
    classes, starts_E = tile_classes(max_tile), _starts(sizes_E)
    x_pad = jnp.pad(x_NxD, ((0, MIN_TILE), (0, 0)))

    def per_expert(e, carry):
        wg_e, wu_e, wd_e = wg_ExDxF[e], wu_ExDxF[e], wd_ExFxD[e]

        def tile(s, row0, valid, carry):
            y_pad, g_pad, u_pad = carry
            x_t = _rows(x_pad, row0, s)
            g_t = jnp.dot(x_t, wg_e, preferred_element_type=jnp.float32)
            u_t = jnp.dot(x_t, wu_e, preferred_element_type=jnp.float32)
            y_t = jnp.dot((jax.nn.silu(g_t) * u_t).astype(dt), wd_e, preferred_element_type=jnp.float32)
            put = lambda buf, t: jax.lax.dynamic_update_slice_in_dim(buf, t.astype(dt), row0, axis=0)
            return put(y_pad, y_t), put(g_pad, g_t), put(u_pad, u_t)

        return _expert_tiles(starts_E[e], sizes_E[e], classes, tile, carry)

    like = (x_NxD, wg_ExDxF, wu_ExDxF, wd_ExFxD, sizes_E)
    init = (vzeros((N + MIN_TILE, D), dt, *like), vzeros((N + MIN_TILE, F), dt, *like),
            vzeros((N + MIN_TILE, F), dt, *like))
    y_pad, g_pad, u_pad = jax.lax.fori_loop(0, sizes_E.shape[0], per_expert, init)
    return _live_rows(y_pad[:N], jnp.sum(sizes_E)), (x_pad, g_pad, u_pad)


def _swiglu_tiles_bwd(x_pad, g_pad, u_pad, dy_NxD, wg_ExDxF, wu_ExDxF, wd_ExFxD, sizes_E, max_tile):
    E, D, F = wg_ExDxF.shape
    N, dt = dy_NxD.shape[0], x_pad.dtype
    classes, starts_E = tile_classes(max_tile), _starts(sizes_E)
    dy_pad = jnp.pad(dy_NxD.astype(dt), ((0, MIN_TILE), (0, 0)))
    tn = (((0,), (0,)), ((), ()))  # aᵀ·b over the tile's rows
    nt = (((1,), (1,)), ((), ()))  # a·bᵀ
    f32 = dict(preferred_element_type=jnp.float32)
    like = (x_pad, g_pad, u_pad, dy_NxD, wg_ExDxF, wu_ExDxF, wd_ExFxD, sizes_E)

    def per_expert(e, carry):
        dx_pad, dwg, dwu, dwd, accs = carry
        wg_e, wu_e, wd_e = wg_ExDxF[e], wu_ExDxF[e], wd_ExFxD[e]
        start = starts_E[e]

        def tile(s, row0, valid, c):
            dx_pad, accs = c
            keep = (jnp.arange(s) < valid)[:, None]
            dy_t = jnp.where(keep, _rows(dy_pad, row0, s), 0)  # overhang rows: no gradient
            x_t = _rows(x_pad, row0, s)
            g_t, u_t = _rows(g_pad, row0, s).astype(jnp.float32), _rows(u_pad, row0, s).astype(jnp.float32)
            sig_t = jax.nn.sigmoid(g_t)
            silu_t = g_t * sig_t
            dh_t = jax.lax.dot_general(dy_t, wd_e, nt, **f32)
            dg_t = (dh_t * u_t * sig_t * (1 + g_t * (1 - sig_t))).astype(dt)
            du_t = (dh_t * silu_t).astype(dt)
            dx_t = jax.lax.dot_general(dg_t, wg_e, nt, **f32) + jax.lax.dot_general(du_t, wu_e, nt, **f32)
            # The expert's first tile overwrites the accumulators (no per-expert zero fill).
            first = row0 == start
            acc = lambda a, b, old: jax.lax.dot_general(a, b, tn, **f32) + jnp.where(first, 0.0, old)
            accs = (acc(x_t, dg_t, accs[0]), acc(x_t, du_t, accs[1]), acc((silu_t * u_t).astype(dt), dy_t, accs[2]))
            return jax.lax.dynamic_update_slice_in_dim(dx_pad, dx_t.astype(dt), row0, axis=0), accs

        dx_pad, accs = _expert_tiles(start, sizes_E[e], classes, tile, (dx_pad, accs))
        has_rows = sizes_E[e] > 0  # an empty expert ran no tile: its accumulators are stale
        put = lambda buf, a: jax.lax.dynamic_update_index_in_dim(
            buf, jnp.where(has_rows, a, 0).astype(buf.dtype), e, axis=0)
        return dx_pad, put(dwg, accs[0]), put(dwu, accs[1]), put(dwd, accs[2]), accs

    accs = (vzeros((D, F), jnp.float32, *like), vzeros((D, F), jnp.float32, *like), vzeros((F, D), jnp.float32, *like))
    init = (vzeros((N + MIN_TILE, D), dt, *like), vzeros(wg_ExDxF.shape, wg_ExDxF.dtype, *like),
            vzeros(wu_ExDxF.shape, wu_ExDxF.dtype, *like), vzeros(wd_ExFxD.shape, wd_ExFxD.dtype, *like), accs)
    dx_pad, dwg, dwu, dwd, _ = jax.lax.fori_loop(0, E, per_expert, init)
    return _live_rows(dx_pad[:N], jnp.sum(sizes_E)), dwg, dwu, dwd


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu_tiles(x_NxD, wg, wu, wd, sizes_E, max_tile):
    return _swiglu_tiles_fwd(x_NxD, wg, wu, wd, sizes_E, max_tile)[0]


def _swiglu_vjp_fwd(x_NxD, wg, wu, wd, sizes_E, max_tile):
    y, saved = _swiglu_tiles_fwd(x_NxD, wg, wu, wd, sizes_E, max_tile)
    return y, (*saved, wg, wu, wd, sizes_E)


def _swiglu_vjp_bwd(max_tile, res, dy_NxD):
    x_pad, g_pad, u_pad, wg, wu, wd, sizes_E = res
    return (*_swiglu_tiles_bwd(x_pad, g_pad, u_pad, dy_NxD, wg, wu, wd, sizes_E, max_tile), None)


_swiglu_tiles.defvjp(_swiglu_vjp_fwd, _swiglu_vjp_bwd)


def grouped_swiglu(x_NxD, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, sizes_E, *, impl: str | None = None,
                   max_tile: int | None = None) -> jax.Array:
    """Expert e's SwiGLU, down(silu(x·gate[e]) ⊙ x·up[e]), on group e's rows; rows past the groups → 0."""
    impl = impl or default_impl()
    dt = x_NxD.dtype
    wg, wu, wd = (w.astype(dt) for w in (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD))
    sizes_E = sizes_E.astype(jnp.int32)
    if impl == "ragged":
        h = jax.nn.silu(gmm(x_NxD, wg, sizes_E, impl=impl)) * gmm(x_NxD, wu, sizes_E, impl=impl)
        return gmm(h, wd, sizes_E, impl=impl)
    if impl != "tiles":
        raise ValueError(f"grouped_swiglu impl {impl!r}: choose 'tiles' or 'ragged'")
    x_NxD, wg, wu, wd, sizes_E = match_varying(x_NxD, wg, wu, wd, sizes_E)
    return _swiglu_tiles(x_NxD, wg, wu, wd, sizes_E, max_tile or default_max_tile(x_NxD.shape[0], wg.shape[0]))


def default_impl() -> str:
    return "tiles" if jax.default_backend() == "cpu" else "ragged"


def default_max_tile(num_rows: int, num_groups: int) -> int:
    """Largest tile ≈ the mean group size (≥ 8, ≤ 256): big enough for efficient matmuls,
    small enough that few groups need more than one big tile."""
    mean = max(num_rows // max(num_groups, 1), MIN_TILE)
    t = MIN_TILE
    while t * 2 <= min(mean, 256):
        t *= 2
    return t


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x_NxD, w_ExDxF, sizes_E, impl, max_tile):
    return _gmm_fwd_value(x_NxD, w_ExDxF, sizes_E, impl, max_tile, transpose_w=False)


def _gmm_fwd_value(x, w, sizes, impl, max_tile, transpose_w):
    if impl == "ragged":
        w = jnp.swapaxes(w, 1, 2) if transpose_w else w
        return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    return _gmm_tiles(x, w, sizes, transpose_w, max_tile, x.dtype)


def _gmm_fwd(x, w, sizes, impl, max_tile):
    return _gmm(x, w, sizes, impl, max_tile), (x, w, sizes)


def _gmm_bwd(impl, max_tile, res, dy_NxF):
    x_NxD, w_ExDxF, sizes_E = res
    dx = _gmm_fwd_value(dy_NxF.astype(x_NxD.dtype), w_ExDxF, sizes_E, impl, max_tile, transpose_w=True)
    if impl == "ragged":
        dw = _tgmm_ragged(x_NxD, dy_NxF.astype(x_NxD.dtype), sizes_E, w_ExDxF.shape[0], w_ExDxF.dtype)
    else:
        dw = _tgmm_tiles(x_NxD, dy_NxF.astype(x_NxD.dtype), sizes_E, w_ExDxF.shape[0], max_tile, w_ExDxF.dtype)
    return dx, dw, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x_NxD: jax.Array, w_ExDxF: jax.Array, sizes_E: jax.Array, *, impl: str | None = None,
        max_tile: int | None = None) -> jax.Array:
    """Grouped matmul (see module docstring). w is cast to x's dtype; accumulation is float32."""
    impl = impl or default_impl()
    if impl not in ("tiles", "ragged"):
        raise ValueError(f"gmm impl {impl!r}: choose 'tiles' or 'ragged'")
    max_tile = max_tile or default_max_tile(x_NxD.shape[0], w_ExDxF.shape[0])
    x_NxD, w_ExDxF, sizes_E = match_varying(x_NxD, w_ExDxF.astype(x_NxD.dtype), sizes_E.astype(jnp.int32))
    return _gmm(x_NxD, w_ExDxF, sizes_E, impl, max_tile)


def tgmm(x_NxD: jax.Array, dy_NxF: jax.Array, sizes_E: jax.Array, *, impl: str | None = None,
         max_tile: int | None = None, out_dtype=None) -> jax.Array:
    """dw[e] = x_eᵀ · dy_e over the groups (exposed for tests; gmm's VJP uses it), accumulated in
    float32 and returned in `out_dtype` (default: x's dtype)."""
    impl = impl or default_impl()
    E = sizes_E.shape[0]
    out_dtype = out_dtype or x_NxD.dtype
    if impl == "ragged":
        return _tgmm_ragged(x_NxD, dy_NxF, sizes_E.astype(jnp.int32), E, out_dtype)
    max_tile = max_tile or default_max_tile(x_NxD.shape[0], E)
    return _tgmm_tiles(x_NxD, dy_NxF, sizes_E.astype(jnp.int32), E, max_tile, out_dtype)

"""Expert parallelism on 8 fake CPU devices: equal to one device, experts really sharded,
composes with data and fsdp sharding; send-buffer overflow either goes in extra rounds (default:
still equal to one device) or is dropped exactly as defined.

The checks need `--xla_force_host_platform_device_count=8` before JAX starts, and pytest has
started JAX already (other test files), so the pytest test runs this file as a script in a fresh
process and reports each failed check with its traceback.
Tolerance (float32): max |a − b| ≤ 1e-5 · max(1, max |b|), as in test_moe.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

from jax.sharding import AbstractMesh

from llama4_jax.model.expert_parallel import token_axes
from llama4_jax.parallel.rules import DEFAULT_RULES, logical_rules

DEVICES = 8


def test_token_axes_follow_the_batch_rule():
    """The shard_map splits tokens as the rules table's `batch` entry shards activations: its
    axes of size > 1, in its order; `expert` added when the rule leaves it out."""
    mesh = AbstractMesh((2, 2, 2, 1), ("data", "fsdp", "expert", "tensor"))
    assert token_axes(mesh, DEFAULT_RULES) == ("data", "fsdp", "expert")
    assert token_axes(mesh, {**DEFAULT_RULES, "batch": ("data", "expert")}) == ("data", "expert")
    assert token_axes(mesh, {**DEFAULT_RULES, "batch": ("expert", "data")}) == ("expert", "data")
    assert token_axes(mesh, {**DEFAULT_RULES, "batch": "data"}) == ("data", "expert")
    assert token_axes(mesh, {**DEFAULT_RULES, "batch": ("data", "tensor", "fsdp")}) == ("data", "fsdp", "expert")
    with logical_rules({**DEFAULT_RULES, "batch": ("fsdp", "expert")}):  # the runner's table
        assert token_axes(mesh) == ("fsdp", "expert")


def test_expert_parallel_on_8_cpu_devices():
    # Backend optimisation off: compiles take half as long (the programs here are small and run
    # once); every EP program and its single-device oracle are compiled with the same flag.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES} --xla_backend_optimization_level=0")
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    report = f"--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}"
    assert r.returncode == 0, f"expert-parallel checks failed (exit {r.returncode})\n{report}"
    assert "ALL OK" in r.stdout, report


# --- everything below runs in the subprocess ------------------------------------------------------
def _checks():
    import traceback

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_moe import D, close, per_copy_outputs

    from llama4_jax.model import moe as moe_lib
    from llama4_jax.model.config import MoEConfig, MoERuntime
    from llama4_jax.model.expert_parallel import send_capacity

    assert jax.device_count() == DEVICES, jax.devices()
    AXES = ("data", "fsdp", "expert", "tensor")

    def mesh_of(**sizes):
        shape = tuple(sizes.get(a, 1) for a in AXES)
        return jax.sharding.Mesh(np.asarray(jax.devices()).reshape(shape), AXES)

    def build(seed=0, **kw):
        """MoEConfig (architecture) and MoERuntime (ep_buffer_factor, ep_overflow, ...) keywords."""
        run_keys = set(MoERuntime.__dataclass_fields__)
        run = MoERuntime(**{k: v for k, v in kw.items() if k in run_keys})
        cfg = MoEConfig(**{"num_experts": 8, "top_k": 1, "expert_ff": 24,
                           **{k: v for k, v in kw.items() if k not in run_keys}})
        return moe_lib.MoE(cfg, D, run=run, param_dtype=jnp.float32, std=0.3, rngs=nnx.Rngs(seed))

    def fwd_bwd(model, x, dispatch=None):
        """→ ((loss, (y, metrics)), (grads, dx)) and the compiled program's HLO text."""
        graphdef, state = nnx.split(model)

        def f(state, x):
            y, metrics = nnx.merge(graphdef, state)(x, dispatch=dispatch)
            return jnp.sum(jnp.sin(y)), (y, metrics)

        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True)).lower(state, x).compile()
        return compiled(state, x), compiled.as_text()

    def shard(model, x, mesh, fsdp=False):
        """Experts over `expert` (and their embed dim over `fsdp`), tokens over the batch axes."""
        gate_spec = P("expert", "fsdp" if fsdp else None, None)
        down_spec = P("expert", None, "fsdp" if fsdp else None)
        for v, spec in ((model.experts.gate, gate_spec), (model.experts.up, gate_spec),
                        (model.experts.down, down_spec)):
            v[...] = jax.device_put(v[...], NamedSharding(mesh, spec))
        for path, v in nnx.to_flat_state(nnx.state(model)):
            if "experts" not in path:
                v[...] = jax.device_put(v[...], NamedSharding(mesh, P()))
        batch = tuple(a for a in ("data", "fsdp", "expert") if mesh.shape[a] > 1)
        return jax.device_put(x, NamedSharding(mesh, P(batch)))

    def spec3(a):
        spec = tuple(a.sharding.spec)
        return spec + (None,) * (a.ndim - len(spec))

    def compare(got, ref, what):
        (_, (y, m)), (g, gx) = got
        (_, (y_ref, m_ref)), (g_ref, gx_ref) = ref
        close(y, y_ref, f"{what} y")
        close(gx, gx_ref, f"{what} dx")
        flat_ref = dict(nnx.to_flat_state(g_ref))
        for path, v in nnx.to_flat_state(g):
            close(v[...], flat_ref[path][...], f"{what} d{'.'.join(map(str, path))}")
        for key in moe_lib.METRIC_KEYS:
            if key != "ep_overflow_frac":  # the oracle has no send buffer; checked by the callers
                close(m[key], m_ref[key], f"{what} metric {key}")

    def equal_to_single_device(mesh_sizes, router, top_k, shared, fsdp=False, skew=False, factor=None):
        ep = mesh_sizes["expert"]
        # factor = ep: C = all local copies, so no overflow is possible; smaller ones may overflow,
        # and the default ep_overflow="rounds" must still give the single-device answer.
        cap = {"ep_max_rounds": 0} if skew else {}  # skew needs up to 8 rounds: no cap, never drops
        model = build(router=router, top_k=top_k, shared_expert=shared, ep_buffer_factor=factor or float(ep), **cap)
        if skew:  # experts 0 and 1 (device 0) take most copies
            model.router[...] = model.router[...].at[:, 0].add(0.15).at[:, 1].add(0.1)
        x = jax.random.normal(jax.random.PRNGKey(1), (8, 32 if skew else 8, D))
        if skew:  # 32 tokens per shard, C = 8: up to 8 rounds
            x = jnp.abs(x)
        dense_ref, _ = fwd_bwd(model, x, "dense")  # single device: no mesh set
        mesh = mesh_of(**mesh_sizes)
        xs = shard(model, x, mesh, fsdp)
        want = P("expert", "fsdp", None) if fsdp else P("expert", None, None)
        assert spec3(model.experts.gate[...]) == tuple(want), model.experts.gate[...].sharding
        assert model.experts.gate[...].addressable_shards[0].data.shape[0] == 8 // ep
        with jax.set_mesh(mesh):
            got, hlo = fwd_bwd(model, xs)
        assert "all-to-all" in hlo, "the expert-parallel path did not run"
        (_, (_, m)), (g, _) = got
        g_gate = dict(nnx.to_flat_state(g))[("experts", "gate")][...]
        assert spec3(g_gate)[0] == "expert", g_gate.sharding
        if factor is None:
            assert float(m["ep_overflow_frac"]) == 0.0
        if skew:  # several extra rounds really ran: a quarter or more of the copies were past C
            assert float(m["ep_overflow_frac"]) > 0.25, float(m["ep_overflow_frac"])
        assert float(m["dropped_frac"]) == 0.0
        compare(got, dense_ref, "EP vs single-device dense oracle")

    def overflow_is_counted_and_exact(rounds=1):
        """ep_overflow=drop (rounds=1), or `rounds` rounds capped by ep_max_rounds: copies of rank
        ≥ rounds·C at their (source, destination) pair are dropped, the rest are exact."""
        ep, data = 4, 2
        extra = {"ep_overflow": "drop"} if rounds == 1 else {"ep_max_rounds": rounds}
        model = build(top_k=2, shared_expert=False, ep_buffer_factor=0.5, **extra)
        model.router[...] = model.router[...].at[:, 0].add(0.15).at[:, 1].add(0.1)  # experts 0, 1: device 0
        x = jnp.abs(jax.random.normal(jax.random.PRNGKey(2), (8, 8 * rounds, D)))
        T, k, E_l, shards = 64 * rounds, 2, 2, data * ep
        T_l = T // shards
        C = send_capacity(model.run, T_l * k, ep)
        logits = np.asarray(x.reshape(-1, D) @ model.router[...])
        top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        # Definition: per source shard and destination device, copies in token-major order; the
        # first C are sent, the rest overflow.
        kept = np.zeros((T, k), bool)
        for s in range(shards):
            sent = np.zeros(ep, int)
            for t in range(s * T_l, (s + 1) * T_l):
                for j in range(k):
                    d = top[t, j] // E_l
                    kept[t, j] = sent[d] < C * rounds
                    sent[d] += 1
        assert 0 < (~kept).sum() < kept.size // 2, (~kept).sum()
        expect = (per_copy_outputs(model, x, top) * kept[..., None]).sum(1).reshape(x.shape)
        mesh = mesh_of(data=data, expert=ep)
        xs = shard(model, x, mesh)
        with jax.set_mesh(mesh):
            y, m = nnx.jit(lambda m, x: m(x))(model, xs)
        close(y, expect, "EP output with overflow")
        frac = (~kept).mean()
        if rounds == 1:
            assert abs(float(m["ep_overflow_frac"]) - frac) < 1e-7, (float(m["ep_overflow_frac"]), frac)
        else:  # overflow counts every copy past the first buffer; only those past the cap drop
            assert float(m["ep_overflow_frac"]) > frac
        assert abs(float(m["dropped_frac"]) - frac) < 1e-7, (float(m["dropped_frac"]), frac)

    def fp8_experts_under_ep():
        """FP8 experts (delayed scaling) inside the shard_map: same forward and same recorded
        amax histories as one device running the same FP8 experts, float8 really in the program."""
        from llama4_jax.model.fp8 import Fp8GroupedDot

        def build8():
            cfg = MoEConfig(num_experts=8, top_k=2, expert_ff=24, shared_expert=False)
            return moe_lib.MoE(cfg, D, param_dtype=jnp.float32, std=0.3, rngs=nnx.Rngs(0),
                               make_fp8_experts=lambda: Fp8GroupedDot("delayed", 4))

        x = jax.random.normal(jax.random.PRNGKey(3), (8, 8, D))
        ref = build8()
        step = nnx.jit(lambda m, x: m(x)[0])
        y_ref = [step(ref, x) for _ in range(2)]  # 2 calls: the second uses the recorded history
        model = build8()
        mesh = mesh_of(data=2, expert=4)
        xs = shard(model, x, mesh)
        with jax.set_mesh(mesh):
            y = [step(model, xs) for _ in range(2)]
            ((_, _), (g, gx)), hlo = fwd_bwd(model, xs)
        assert "all-to-all" in hlo and "f8e4m3" in hlo, "FP8 experts did not run inside the EP path"
        for a, b in zip(y, y_ref):
            close(a, b, "EP FP8 y vs single-device FP8")
        for site, site_ref in zip(model.experts.fp8, ref.experts.fp8):
            close(site.x_hist[...], site_ref.x_hist[...], "x amax history")
            close(site.w_hist[...], site_ref.w_hist[...], "w amax history")
        # FP8 changes the answer: the f32 experts differ by far more than the tolerance.
        f32 = moe_lib.MoE(MoEConfig(num_experts=8, top_k=2, expert_ff=24, shared_expert=False), D,
                          param_dtype=jnp.float32, std=0.3, rngs=nnx.Rngs(0))
        assert np.abs(np.asarray(f32(x)[0]) - np.asarray(y_ref[0])).max() > 1e-3
        # Gradients flow through the FP8 experts in the shard_map (e5m2, per-shard scales).
        assert all(np.isfinite(np.asarray(v[...])).all() for _, v in nnx.to_flat_state(g))
        assert np.isfinite(np.asarray(gx)).all()

    def batch_rule_override():
        """mesh.rules.batch = (data, expert): fsdp replicates the tokens (and splits the experts'
        embed dim). The EP path splits the tokens as the rule does, so they leave it sharded that
        way, and it still equals the single-device oracle."""
        model = build(router="sigmoid", top_k=2, shared_expert=True)
        x = jax.random.normal(jax.random.PRNGKey(4), (8, 8, D))
        dense_ref, _ = fwd_bwd(model, x, "dense")
        mesh = mesh_of(data=2, fsdp=2, expert=2)
        shard(model, x, mesh, fsdp=True)
        batch = ("data", "expert")
        xs = jax.device_put(x, NamedSharding(mesh, P(batch)))
        with jax.set_mesh(mesh), logical_rules({**DEFAULT_RULES, "batch": batch}):
            got, hlo = fwd_bwd(model, xs)
        assert "all-to-all" in hlo, "the expert-parallel path did not run"
        (_, (y, _)), _ = got
        assert spec3(y)[0] == batch, y.sharding
        compare(got, dense_ref, "EP (batch rule overridden) vs single-device dense oracle")

    d2e4, e8 = {"data": 2, "expert": 4}, {"expert": 8}
    checks = {
        "data=2,expert=4 sigmoid top-1 shared": lambda: equal_to_single_device(d2e4, "sigmoid", 1, True),
        "data=2,expert=4 softmax top-2": lambda: equal_to_single_device(d2e4, "softmax", 2, False),
        "data=1,expert=8 sigmoid top-2": lambda: equal_to_single_device(e8, "sigmoid", 2, False),
        "data=1,expert=8 softmax top-1 shared": lambda: equal_to_single_device(e8, "softmax", 1, True),
        "fsdp=2,expert=4 (experts' embed dim over fsdp)": lambda: equal_to_single_device(
            {"fsdp": 2, "expert": 4}, "sigmoid", 2, True, fsdp=True),
        "data=2,expert=4 skewed, factor 0.5: overflow in extra rounds, still exact": lambda: equal_to_single_device(
            d2e4, "sigmoid", 2, False, skew=True, factor=0.5),
        "data=1,expert=8 default factor 2, softmax top-2": lambda: equal_to_single_device(
            e8, "softmax", 2, True, factor=2.0),
        "ep_overflow=drop: overflow counted, exactly the defined copies dropped": overflow_is_counted_and_exact,
        "ep_max_rounds=2: copies past 2 rounds dropped exactly, the rest exact": lambda: overflow_is_counted_and_exact(2),
        "data=2,expert=4 FP8 experts (delayed scaling) inside the shard_map": fp8_experts_under_ep,
        "data=2,fsdp=2,expert=2, batch rule → (data, expert): tokens split as the rule says": batch_rule_override,
    }
    failed = []
    for name, check in checks.items():
        try:
            check()
            print(f"ok      {name}", flush=True)
        except Exception:  # report every check, then fail
            failed.append(name)
            print(f"FAILED  {name}\n{traceback.format_exc()}", flush=True)
    if failed:
        print(f"{len(failed)} of {len(checks)} checks failed: {failed}")
        sys.exit(1)
    print("ALL OK")


if __name__ == "__main__":
    _checks()

"""`llama4-jax train`: the run, top to bottom.

Phases: 1 config → 2 workdir checks → 3 processes (jax.distributed) + mesh → 4 data →
5 model + state (+ restore) → 6 stage loop (train, log, eval, checkpoint) → 7 summary. Every user
mistake surfaces before anything is written to the workdir. Phases 4-7 live in loop.py.

`--dry-run` stops after 3 and plans on an abstract mesh: the experiment's mesh is planned even
when this machine has fewer devices (then the smallest device count the mesh fits), and per-device
memory comes from shapes and shardings alone, without allocating anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp

from .. import distributed, parallel
from ..config import ConfigError, dump_resolved, load_experiment
from ..data.pipeline import build_mixture
from ..data.sources import SourceSpec
from ..data.tokenizer import make_tokenizer
from ..model import flops as flops_lib
from .curriculum import plan_stages
from .optimizer import build_optimizer, lr_schedule
from .state import abstract_state, init_state


class RunError(ValueError):
    """A user-fixable problem with the run setup (the CLI prints it and exits 2)."""


# --- 1-2: config and workdir --------------------------------------------------------------
def _workdir(args, exp) -> Path:
    return Path(args.workdir or Path("runs") / exp.name).absolute()


def _check_resume(workdir: Path, mode: str) -> None:
    ck = workdir / "checkpoints"
    has = ck.exists() and any(p.name.isdigit() for p in ck.iterdir())
    if mode == "never" and has:
        raise RunError(f"{ck} already holds checkpoints and --resume never was given "
                       "(use another --workdir, or --resume auto to continue)")


# --- 3: mesh --------------------------------------------------------------------------------
def planned_device_count(mesh_cfg, available: int) -> int:
    """Devices a dry run plans for: the available ones if the mesh fits them, else the fewest
    the mesh fits (its fixed axes, with a -1 axis at 1)."""
    try:
        mesh_cfg.resolve(available)
        return available
    except ConfigError:
        return math.prod(max(getattr(mesh_cfg, a), 1) for a in parallel.MESH_AXES)


def _check_mesh(sizes: dict, rules: dict, cfg, plans) -> list[str]:
    """Divisibility of the model and of every stage's batch; returns replication notes."""
    notes = parallel.check_fit(parallel.model_dims(cfg), sizes, rules)
    div = parallel.batch_divisor(sizes, rules)
    for p in plans:
        if p.batch_size % div:
            raise RunError(f"curriculum.stages[{p.index}].batch_size={p.batch_size} is not divisible by the "
                           f"{div} batch shards of mesh {sizes}")
        if p.batch_size % jax.process_count():
            raise RunError(f"stage {p.name}: batch_size {p.batch_size} not divisible by {jax.process_count()} processes")
    return notes


def _mesh(exp, cfg, plans, devices=None, plan_only=False):
    n = len(devices) if devices is not None else jax.device_count()
    if plan_only:
        n = planned_device_count(exp.mesh, n)
    sizes = exp.mesh.resolve(n)
    rules = parallel.merged_rules(exp.mesh.rules)
    notes = _check_mesh(sizes, rules, cfg, plans)
    if plan_only:
        return parallel.abstract_mesh(sizes), rules, sizes, notes
    mesh = parallel.make_mesh(sizes, devices)
    if jax.process_count() > 1:
        parallel.check_batch_layout(mesh, rules)
    return mesh, rules, sizes, notes


# --- 4: data --------------------------------------------------------------------------------
def _data(exp, plans, workdir: Path):
    tok = exp.data.tokenizer
    tokenizer = make_tokenizer(tok.type, str(tok.path) if tok.path else None)
    specs = [SourceSpec(name=n, path=s.path, kind=s.kind, field=s.field, split=s.split,
                        eval_fraction=s.eval_fraction) for n, s in exp.data.sources.items()]
    first = plans[0]
    it = build_mixture(specs, tokenizer, seed=exp.seed, seq_len=first.seq_len, global_batch=first.batch_size,
                       weights=first.mixture, stage_index=0, process_index=jax.process_index(),
                       process_count=jax.process_count(),
                       cache_dir=str(exp.data.cache_dir) if exp.data.cache_dir else None)
    return tokenizer, it


# --- 5: model and state ---------------------------------------------------------------------
def _make_tx_factory(exp, stages, total_steps):
    schedule = lr_schedule(exp.optimizer, stages, total_steps)
    dt = jnp.dtype(exp.precision.opt_state_dtype)
    return (lambda params: build_optimizer(exp.optimizer, params, schedule, dt)), schedule


def init_sharded(cfg, seed: int, make_tx, shardings):
    """A fresh TrainState made by one jitted program straight into `shardings`: each device
    computes only its own shards, so no device ever holds the whole model (eager init then
    `device_put` would first build all of a 400B-parameter model on one device). The values are
    `init_state`'s up to ~1e-8 (the truncated normal's erf-inverse fuses differently under jit)."""
    return jax.jit(lambda: init_state(cfg, seed, make_tx)[1], out_shardings=shardings)()


# --- the run ---------------------------------------------------------------------------------
class Run:
    """Everything decided before training: config, stages, processes, mesh, rules, optimizer.
    `devices` restricts the mesh to a subset (tests); a dry run (`args.dry_run`) plans on an
    abstract mesh and never starts jax.distributed."""

    def __init__(self, args, devices=None):
        self.args = args
        self.plan_only = bool(getattr(args, "dry_run", False))
        self.exp = load_experiment(args.experiment, args.overrides).resolved()
        self.cfg = self.exp.to_model_config()
        stages = self.exp.curriculum.resolved_stages()
        self.plans = plan_stages(stages)
        self.workdir = _workdir(args, self.exp)
        _check_resume(self.workdir, args.resume)
        # Before the first device query: jax.distributed must start before the backend does.
        self.processes = "planning only" if self.plan_only else distributed.initialize()
        self.mesh, self.rules, self.mesh_sizes, self.mesh_notes = _mesh(
            self.exp, self.cfg, self.plans, devices, self.plan_only)
        parallel.set_rules(self.rules)  # the activation constraints inside the model read these
        self.make_tx, self.schedule = _make_tx_factory(self.exp, stages, self.plans[-1].end)

    # -- dry run
    def memory_plan(self) -> dict[str, tuple[int, int]]:
        """{params | opt_state | extra: (bytes per device, bytes in total)}, from shapes only."""
        _, abstract, _ = abstract_state(self.cfg, self.make_tx)
        shard = parallel.tree_shardings(abstract, self.mesh, self.rules)
        return {part: (parallel.per_device_bytes(getattr(abstract, part), getattr(shard, part)),
                       parallel.total_bytes(getattr(abstract, part))) for part in ("params", "opt_state", "extra")}

    def describe(self) -> str:
        total, active = flops_lib.param_counts(self.cfg)
        p0 = self.plans[0]
        fpt = flops_lib.flops_per_token(self.cfg, p0.seq_len)
        mem = self.memory_plan()
        n = math.prod(self.mesh_sizes.values())
        here = f"{jax.device_count()} {jax.devices()[0].platform} devices"
        where = f"over {here}" if n == jax.device_count() else f"over {n} devices (planned; this host has {here})"
        fmt = parallel.format_bytes
        per_dev = sum(d for d, _ in mem.values())
        lines = [dump_resolved(self.exp).rstrip(), "---",
                 f"parameters: {total:,} total, {active:,} active per token",
                 f"training FLOPs per token (seq {p0.seq_len}): {fpt:.4g}",
                 f"mesh: {self.mesh_sizes} {where}",
                 *(f"mesh note: {note}" for note in self.mesh_notes),
                 "state memory per device: " + ", ".join(
                     f"{label} {fmt(mem[part][0])}" for label, part in
                     (("params", "params"), ("optimizer", "opt_state"), ("other", "extra")))
                 + f"; total {fmt(per_dev)} (gradients and activations come on top)",
                 *(f"state bytes {label}: {mem[part][0]:,} per device of {mem[part][1]:,}" for label, part in
                   (("params", "params"), ("optimizer", "opt_state"), ("other", "extra"))),
                 "curriculum: " + ", ".join(f"{p.name} {p.steps} steps × {p.batch_size}×{p.seq_len}" for p in self.plans)]
        return "\n".join(lines)


def train_main(args) -> int:
    from .loop import train_loop

    try:
        run = Run(args)
    except (parallel.MeshError, RunError, distributed.DistributedError) as e:
        raise ConfigError(str(e)) from None
    if args.dry_run:
        print(run.describe())
        return 0
    if jax.process_count() > 1:  # each process says who it is: the first line to look for in a job's logs
        print(f"llama4-jax: {run.processes}", flush=True)
    from ..cli import _user_error_types

    with distributed.fail_fast(passthrough=_user_error_types()):
        return train_loop(run)

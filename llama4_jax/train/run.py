"""`llama4-jax train`: the run, top to bottom.

Phases: 1 config → 2 workdir checks → 3 mesh → 4 data → 5 model + state (+ restore) →
6 stage loop (train, log, eval, checkpoint) → 7 summary. Every user mistake surfaces before
anything is written to the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import parallel
from ..config import ConfigError, dump_resolved, load_experiment
from ..data.pipeline import build_mixture
from ..data.sources import SourceSpec
from ..data.tokenizer import make_tokenizer
from ..model import flops as flops_lib
from ..model.store import config_to_dict
from . import checkpoint as ckpt_lib
from .curriculum import MixtureControl, plan_stages, stage_at
from .metrics import MetricsWriter, device_peak_flops
from .optimizer import build_optimizer, lr_schedule
from .state import abstract_state, init_state
from .step import StepConfig, make_eval_step, make_train_step

MAX_BAD_STEPS = 20  # consecutive non-finite steps before the run gives up


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
def _mesh(exp, cfg, plans):
    sizes = exp.mesh.resolve(jax.device_count())
    mesh = parallel.make_mesh(sizes)
    rules = parallel.merged_rules(exp.mesh.rules)
    div = parallel.batch_divisor(mesh, rules) * 1
    for p in plans:
        if p.batch_size % div:
            raise RunError(f"curriculum.stages[{p.index}].batch_size={p.batch_size} is not divisible by the "
                           f"{div} batch shards of mesh {sizes}")
        if p.batch_size % jax.process_count():
            raise RunError(f"stage {p.name}: batch_size {p.batch_size} not divisible by {jax.process_count()} processes")
    if cfg.moe.num_experts % sizes["expert"]:
        raise RunError(f"mesh.expert={sizes['expert']} does not divide num_experts={cfg.moe.num_experts}")
    return mesh, rules, sizes


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


def _init_from(path: str, cfg):
    from ..model.store import load_any, model_from_flat

    src_cfg, flat = load_any(Path(path))
    if dataclasses.replace(src_cfg, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                           remat=cfg.remat, scan_layers=cfg.scan_layers) != cfg:
        raise RunError(f"init_from {path}: its model config differs from this experiment's model")
    return model_from_flat(src_cfg, flat)


# --- the run ---------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.exp = load_experiment(args.experiment, args.overrides).resolved()
        self.cfg = self.exp.to_model_config()
        stages = self.exp.curriculum.resolved_stages()
        self.plans = plan_stages(stages)
        self.workdir = _workdir(args, self.exp)
        _check_resume(self.workdir, args.resume)
        self.mesh, self.rules, self.mesh_sizes = _mesh(self.exp, self.cfg, self.plans)
        self.make_tx, self.schedule = _make_tx_factory(self.exp, stages, self.plans[-1].end)

    # -- dry run
    def describe(self) -> str:
        total, active = flops_lib.param_counts(self.cfg)
        p0 = self.plans[0]
        fpt = flops_lib.flops_per_token(self.cfg, p0.seq_len)
        graphdef, abstract, _ = abstract_state(self.cfg, self.make_tx)
        shard = parallel.tree_shardings(abstract, self.mesh, self.rules)
        per_dev = _per_device_bytes(abstract, shard)
        lines = [dump_resolved(self.exp).rstrip(), "---",
                 f"parameters: {total:,} total, {active:,} active per token",
                 f"training FLOPs per token (seq {p0.seq_len}): {fpt:.4g}",
                 f"mesh: {self.mesh_sizes} over {jax.device_count()} {jax.devices()[0].platform} devices",
                 f"state memory per device: params {per_dev['params'] / 2**30:.2f} GiB, "
                 f"optimizer {per_dev['opt_state'] / 2**30:.2f} GiB, other {per_dev['extra'] / 2**30:.3f} GiB",
                 f"curriculum: " + ", ".join(f"{p.name} {p.steps} steps × {p.batch_size}×{p.seq_len}" for p in self.plans)]
        return "\n".join(lines)


def _per_device_bytes(abstract, shardings) -> dict[str, float]:
    out = {}
    for part in ("params", "opt_state", "extra"):
        tree, sh = getattr(abstract, part), getattr(shardings, part)
        leaves, shl = jax.tree.leaves(tree), jax.tree.leaves(sh)
        tot = 0.0
        for a, s in zip(leaves, shl):
            n = math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
            shards = math.prod(s.mesh.shape[ax] for ax in _spec_axes(s.spec)) if hasattr(s, "spec") else 1
            tot += n / shards
        out[part] = tot
    return out


def _spec_axes(spec):
    for entry in spec:
        if entry is None:
            continue
        yield from ((entry,) if isinstance(entry, str) else entry)


def train_main(args) -> int:
    from .loop import train_loop

    try:
        run = Run(args)
    except (parallel.MeshError, RunError) as e:
        raise ConfigError(str(e)) from None
    if args.dry_run:
        print(run.describe())
        return 0
    return train_loop(run)

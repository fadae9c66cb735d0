"""The training loop proper: stages, steps, logging, eval, checkpoints, preemption."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from .. import parallel
from ..config import ConfigError, dump_resolved
from ..model import flops as flops_lib
from ..model.store import config_from_dict, config_to_dict
from . import checkpoint as ckpt_lib
from .curriculum import MixtureControl, stage_at
from .metrics import MetricsWriter, device_peak_flops
from .progress import StageProgress
from .state import init_state
from .step import StepConfig, make_eval_step, make_train_step

log = logging.getLogger("llama4_jax")
MAX_BAD_STEPS = 20  # consecutive non-finite steps before the run stops


class Preemption:
    """SIGTERM/SIGINT: finish the step, save, exit 0. A second SIGINT aborts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            print("llama4-jax: second interrupt, aborting without saving", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.requested = True
        print(f"llama4-jax: {signal.Signals(signum).name} received; saving a checkpoint after this step",
              file=sys.stderr, flush=True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _config_mismatch(saved: dict, cfg) -> str | None:
    """Name the first model field that differs between a checkpoint and this run."""
    mine = config_to_dict(cfg)
    for key in mine:
        if key in ("param_dtype", "compute_dtype", "remat", "scan_layers"):
            continue
        a, b = saved.get(key), mine[key]
        if isinstance(b, tuple):
            a, b = tuple(a or ()), b
        if a != b:
            return f"{key} (checkpoint: {a}, experiment: {b})"
    return None


class Trainer:
    def __init__(self, run):
        self.run = run
        self.exp, self.cfg, self.plans = run.exp, run.cfg, run.plans
        self.main = jax.process_index() == 0

    # -- setup ------------------------------------------------------------------------
    def setup(self):
        from .run import _data, _init_from

        exp, cfg = self.exp, self.cfg
        self.tokenizer, self.data = _data(exp, self.plans, self.run.workdir)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ConfigError(f"model.overrides.vocab_size: {cfg.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size})")
        model = _init_from(str(exp.init_from), cfg) if exp.init_from else None
        self.ckpt = ckpt_lib.Checkpointer(
            self.run.workdir / "checkpoints", keep_last=exp.checkpoint.keep_last,
            keep_steps=[p.end for p in self.plans] if exp.checkpoint.keep_stage_final else [],
            async_save=exp.checkpoint.async_save)
        with jax.set_mesh(self.run.mesh):
            graphdef, state, tx = init_state(cfg, exp.seed, self.run.make_tx, model)
            self.shardings = parallel.tree_shardings(state, self.run.mesh, self.run.rules)
            self.state = jax.device_put(state, self.shardings)
        self.batch_sharding = parallel.batch_sharding(self.run.mesh, self.run.rules)
        step_cfg = StepConfig(moe=cfg.moe, num_sources=len(self.data.source_names))
        self.train_step = jax.jit(make_train_step(graphdef, tx, step_cfg),
                                  in_shardings=(self.shardings, self.batch_sharding),
                                  out_shardings=(self.shardings, None), donate_argnums=0)
        self.eval_step = jax.jit(make_eval_step(graphdef), in_shardings=(self.shardings, self.batch_sharding))
        self.control = MixtureControl(self.data.source_names)
        self.saved_mixture = None

    def restore(self) -> int:
        steps = self.ckpt.steps()
        if not steps:
            return 0
        meta = self.ckpt.read_meta(steps[-1])
        if meta is not None:
            bad = _config_mismatch(meta.get("model_config", {}), self.cfg)
            if bad:
                raise ckpt_lib.CheckpointError(
                    f"{self.ckpt.directory / str(steps[-1])}: incompatible model config: {bad}")
        abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: self.state), self.shardings)
        got = self.ckpt.restore_latest(abstract, self.data)
        if got is None:
            log.warning("no checkpoint in %s could be restored; starting from scratch", self.ckpt.directory)
            return 0
        step, self.state, meta = got
        self.saved_mixture = meta.get("mixture")
        print(f"llama4-jax: resumed from {self.ckpt.directory / str(step)} (stage {meta['stage']})", flush=True)
        return int(meta["data_step"])

    # -- pieces of a step -------------------------------------------------------------
    def enter_stage(self, plan, resumed: bool):
        weights = self.control.enter(plan)
        if resumed:
            self.control.restore(self.saved_mixture)
            weights = self.control.sampler.weights() if self.control.sampler else plan.mixture
        self.data.set_stage(plan.index, plan.seq_len, plan.batch_size)
        self.data.set_weights(weights)

    def meta(self, step: int, plan) -> dict:
        return {"data_step": step, "stage": plan.name, "stage_index": plan.index,
                "step_in_stage": step - plan.start, "mixture": self.control.state(),
                "model_config": config_to_dict(self.cfg), "experiment": dump_resolved(self.exp)}

    def save(self, step: int, plan) -> None:
        self.ckpt.save(step, self.state, self.data, self.meta(step, plan))

    def evaluate(self, plan) -> dict[str, float]:
        out = {}
        for src in self.data.eval_source_names:
            tot, cnt = 0.0, 0.0
            for b in self.data.eval_batches(src, seq_len=plan.seq_len, global_batch=plan.batch_size,
                                            max_batches=self.exp.eval.batches):
                s, c = self.eval_step(self.state, parallel.global_batch(b, self.batch_sharding))
                tot, cnt = tot + float(s), cnt + float(c)
            if cnt:
                out[f"eval/loss/{src}"] = tot / cnt
        if out:
            out["eval/loss"] = float(np.mean(list(out.values())))
        return out


def _log_scalars(m: dict, names, losses: list) -> tuple[dict, dict]:
    m = jax.device_get(m)
    scalars = {"loss": float(np.mean([float(x) for x in jax.device_get(losses)])),
               "grad_norm": float(m["grad_norm"]), "moe_loss": float(m["moe_loss"])}
    for i, n in enumerate(names):
        if m["src_tokens"][i] > 0:
            scalars[f"loss/{n}"] = float(m["src_loss_sum"][i] / m["src_tokens"][i])
    hists = {}
    for k, v in m.items():
        if not k.startswith("moe/"):
            continue
        name = k[4:]
        for layer, val in enumerate(np.asarray(v)):
            if name == "load":
                hists[f"moe/layer{layer}/load"] = val
            else:
                scalars[f"moe/layer{layer}/{name}"] = float(val)
    return scalars, hists


def train_loop(run) -> int:
    logging.basicConfig(level=logging.WARNING, format="llama4-jax: %(message)s")
    tr = Trainer(run)
    tr.setup()  # data errors surface here, before the workdir is touched
    workdir = run.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if tr.main:
        (workdir / "config.resolved.yaml").write_text(dump_resolved(run.exp))
    step = tr.restore() if run.args.resume == "auto" else 0
    exp, plans, cfg = run.exp, run.plans, run.cfg
    total = plans[-1].end
    writer = MetricsWriter(workdir, exp.logging.tensorboard, enabled=tr.main)
    peak, peak_how = device_peak_flops(cfg.compute_dtype)
    n_dev = jax.device_count()
    preempt = Preemption()
    progress = StageProgress(enabled=exp.logging.progress and tr.main)
    stage_idx, restored, status = -1, step > 0, 0
    losses, t_last, tokens_since, compile_s = [], None, 0, {}
    stage_losses: dict[str, list[float]] = {}
    try:
        with jax.set_mesh(run.mesh):
            while step < total:
                plan = stage_at(plans, step)
                if plan.index != stage_idx:
                    # Resuming inside a stage continues its sampler; at a boundary the new stage starts fresh.
                    tr.enter_stage(plan, resumed=restored and stage_idx == -1 and step > plan.start)
                    stage_idx = plan.index
                    progress.start(plan, step)
                    fpt = flops_lib.flops_per_token(cfg, plan.seq_len)
                    t_last, tokens_since, first = None, 0, True
                batch = parallel.global_batch(next(tr.data), tr.batch_sharding)
                t0 = time.perf_counter()
                tr.state, m = tr.train_step(tr.state, batch)
                if first:
                    jax.block_until_ready(m["loss"])
                    compile_s[plan.name] = time.perf_counter() - t0
                    t_last, first = time.perf_counter(), False
                else:
                    tokens_since += plan.seq_len * plan.batch_size
                losses.append(m["loss"])
                tr.control.observe(m["src_loss_sum"], m["src_tokens"], m["src_rows"])
                new_w = tr.control.maybe_update(step - plan.start, plan.sampler.update_every)
                if new_w is not None:
                    tr.data.set_weights(new_w)
                step += 1
                stage_end = step == plan.end
                if step % exp.logging.every_steps == 0 or stage_end:
                    scalars, hists = _log_scalars(m, tr.data.source_names, losses)
                    if not bool(m["finite"]) or int(tr.state.bad_streak) > 0:
                        log.warning("step %d (stage %s): non-finite loss or gradient; step skipped "
                                    "(%d skipped so far)", step, plan.name, int(tr.state.skipped))
                    now = time.perf_counter()
                    if t_last is not None and tokens_since:
                        tps = tokens_since / (now - t_last)
                        scalars["tokens_per_s"] = tps
                        scalars["mfu"] = fpt * tps / (peak * n_dev)
                    t_last, tokens_since = now, 0
                    scalars.update(stage=plan.name, stage_index=plan.index,
                                   lr=float(run.schedule(int(tr.state.step) - 1 if int(tr.state.step) else 0)),
                                   skipped_steps=int(tr.state.skipped))
                    for k, v in (tr.control.sampler.weights().items() if tr.control.sampler else []):
                        scalars[f"mixture/{k}"] = v
                    writer.write(step, scalars, hists)
                    stage_losses.setdefault(plan.name, []).append(scalars["loss"])
                    progress.update(step, scalars["loss"])
                    losses = []
                    if int(tr.state.bad_streak) >= MAX_BAD_STEPS:
                        print(f"llama4-jax: stopping: {MAX_BAD_STEPS} consecutive non-finite steps at step "
                              f"{step} (stage {plan.name}); the last good checkpoint is kept", file=sys.stderr)
                        return 3
                else:
                    progress.update(step, None)
                if exp.eval.every_steps and (step % exp.eval.every_steps == 0 or stage_end):
                    ev = tr.evaluate(plan)
                    if ev:
                        writer.write(step, {**ev, "stage": plan.name})
                if step % exp.checkpoint.every_steps == 0 or stage_end or preempt.requested or step == total:
                    tr.save(step, plan)
                if preempt.requested:
                    tr.ckpt.wait()
                    print(f"llama4-jax: preempted; checkpoint saved at step {step}", file=sys.stderr, flush=True)
                    return 0
                if stage_end:
                    progress.finish()
    finally:
        progress.close()
        preempt.restore()
        tr.ckpt.close()
        tr.data.close()
        writer.close()
    _summary(workdir, stage_losses, compile_s, peak, peak_how)
    return status


def _summary(workdir: Path, stage_losses, compile_s, peak, peak_how):
    print(f"llama4-jax: done. workdir {workdir}")
    for name, ls in stage_losses.items():
        if ls:
            print(f"  stage {name:<10} loss {ls[0]:.3f} → {ls[-1]:.3f}   (first-step compile {compile_s.get(name, 0):.1f}s)")
    print(f"  device peak {peak / 1e9:.1f} GFLOP/s per device ({peak_how})")

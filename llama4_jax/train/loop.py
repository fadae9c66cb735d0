"""The training loop proper: stages, steps, logging, eval, checkpoints, preemption.

Resume: with `--resume auto` the newest checkpoint that restores is continued (onto this run's
mesh); the global step it holds decides the stage, the mixture and the next batch, so a resumed
run is bit for bit the one that never stopped (same mesh) and metrics.jsonl loses the rows a
killed run logged past its last checkpoint. Checkpoints: every `checkpoint.every_steps`, at every
stage end, at the last step, on SIGUSR1 (carry on) and on SIGTERM/SIGINT (then exit 0).
`LLAMA4_JAX_STOP_AT_STEP=k` (tests, debugging) stops like a SIGTERM right after global step k.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from .. import parallel
from ..config import dump_resolved
from ..errors import CheckpointError, ConfigError, DataError
from ..model import flops as flops_lib
from ..model.special_tokens import SpecialTokens
from ..model.store import (META_TOKENS_KEY, config_from_dict, config_to_dict, flat_shardings, load_any,
                           load_special_tokens, model_from_flat, peek_config, runtime_to_dict)
from . import checkpoint as ckpt_lib
from .curriculum import MixtureControl, stage_at, stage_model_config
from .metrics import MetricsWriter, device_peak_flops
from .oom import is_oom, oom_error
from .preemption import STOP_ENV, Preemption, stop_at_step
from .progress import StageProgress
from .routing_metrics import moe_log
from .run import build_data, init_sharded, new_workdir_paths
from .state import abstract_state, init_state
from .step import BATCH_RANKS, StepConfig, batch_ranks, make_eval_step, make_train_step, media_fields
from .timing import TrainClock

log = logging.getLogger("llama4_jax")


def _config_mismatch(saved: dict, cfg) -> str | None:
    """Name the first architecture field that differs between a checkpoint and this run. Only
    ModelConfig is compared: the runtime (dtypes, remat, dispatch, FP8) and the training knobs
    may change on resume; a file from before the split has its runtime fields dropped here."""
    as_json = lambda d: json.loads(json.dumps(d))  # tuples vs lists: compare as saved
    return _first_difference(as_json(config_to_dict(config_from_dict(saved))), as_json(config_to_dict(cfg)), "")


def _first_difference(saved: dict, mine: dict, prefix: str) -> str | None:
    for key, b in mine.items():
        name = prefix + key
        a = saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            bad = _first_difference(a, b, name + ".")
            if bad:
                return bad
        elif a != b:
            return f"{name} (checkpoint: {a}, experiment: {b})"
    return None


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after `step` (a run killed after its last checkpoint logs
    steps it will redo), so a resumed run's file reads like an uninterrupted one."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if _row_step(ln) <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _row_step(line: str) -> float:
    """A row's step; a row cut short by `kill -9` counts as past any checkpoint (dropped)."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else float("inf")
    except (ValueError, KeyError, TypeError):
        return float("inf")


class Trainer:
    def __init__(self, run):
        self.run = run
        self.exp, self.cfg, self.plans = run.exp, run.cfg, run.plans
        self.main = jax.process_index() == 0

    # -- setup ------------------------------------------------------------------------
    def setup(self):
        """Data, checkpointer, shardings, compiled steps, and the initial state unless a
        checkpoint will be restored (`restore_or_init`): a resumed run never holds a freshly
        initialised copy next to the restored one."""
        exp, cfg, mesh = self.exp, self.cfg, self.run.mesh
        self.tokenizer, self.data = build_data(exp, self.plans, self.run.workdir)
        self.special_tokens = SpecialTokens.from_tokenizer(self.tokenizer)  # init_from / resume replace it
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ConfigError(f"model.overrides.vocab_size: {cfg.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size})")
        with jax.set_mesh(mesh):
            graphdef, abstract, tx = abstract_state(cfg, self.run.make_tx, self.run.rt)
            self.shardings = parallel.tree_shardings(abstract, mesh, self.run.rules)
        resuming = self.run.resuming
        # init_from is checked before the checkpointer creates <workdir>/checkpoints.
        self._init_model = self._init_from(exp.init_from) if exp.init_from and not resuming else None
        self.ckpt = ckpt_lib.Checkpointer(
            self.run.workdir / "checkpoints", keep_last=exp.checkpoint.keep_last,
            keep_steps=[p.end for p in self.plans] if exp.checkpoint.keep_stage_final else [],
            async_save=exp.checkpoint.async_save)
        # Target of a restore: this run's mesh and shardings, whatever mesh wrote the checkpoint.
        self.abstract = ckpt_lib.abstract_with_shardings(abstract, self.shardings)
        self.state = None
        self.batch_sharding = parallel.batch_sharding(mesh, self.run.rules)
        batch_in = parallel.batch_shardings(self.batch_sharding, BATCH_RANKS)
        chunk_rows = exp.loss.chunk_rows
        # One jitted step per (microbatch count, RoPE scaling) the curriculum uses: the count is
        # static (it sets the scan length), and a stage's `rope_scaling` changes the function the
        # model computes, not its parameters (its own graphdef, the same state). train_step is
        # the first stage's (bench and tools time that one).
        graphdefs = {None: graphdef}
        with jax.set_mesh(mesh):
            for p in self.plans:
                if p.rope_scaling is not None and p.rope_scaling not in graphdefs:
                    graphdefs[p.rope_scaling] = abstract_state(stage_model_config(cfg, p), self.run.make_tx,
                                                               self.run.rt)[0]
        # Batches with image or audio rows (data/pipeline.py's media fields) run their own jitted
        # steps, one per set of fields (`media_step`), so a text-only batch runs the text program
        # (jit compiles each on first use).
        self.train_steps, self.eval_steps = {}, {}
        self._step_fns, self._eval_fns, self._media_steps = {}, {}, {}
        for p in self.plans:
            key = self.step_key(p)
            if key not in self.train_steps:
                self._step_fns[key] = make_train_step(graphdefs[p.rope_scaling], tx, StepConfig(
                    len(self.data.source_names), self.run.balancing, chunk_rows, p.microbatches))
                self.train_steps[key] = jax.jit(self._step_fns[key], in_shardings=(self.shardings, batch_in),
                                                out_shardings=(self.shardings, None), donate_argnums=0)
            if p.rope_scaling not in self.eval_steps:
                self._eval_fns[p.rope_scaling] = make_eval_step(graphdefs[p.rope_scaling], chunk_rows)
                self.eval_steps[p.rope_scaling] = jax.jit(self._eval_fns[p.rope_scaling],
                                                          in_shardings=(self.shardings, batch_in))
        self.train_step = self.train_steps[self.step_key(self.plans[0])]
        self.eval_step = self.eval_steps[self.plans[0].rope_scaling]
        self.control = MixtureControl(self.data.source_names)
        self.saved_mixture = None
        if not resuming:
            self.init_fresh()

    def init_fresh(self) -> None:
        """Step 0: random init, or the params of `init_from` (optimizer fresh). Either way the
        state is made on this run's shardings: a fresh one by one jitted program whose outputs
        are those shardings (no device ever holds the whole model), init_from's params read
        slice by slice onto them."""
        model = self._init_model
        if model is None and self.exp.init_from:  # every checkpoint was unrestorable
            model = self._init_from(self.exp.init_from)
        with jax.set_mesh(self.run.mesh):
            if model is None:
                self.state = init_sharded(self.cfg, self.exp.seed, self.run.make_tx, self.shardings, self.run.rt)
            else:
                _, state, _ = init_state(self.cfg, self.exp.seed, self.run.make_tx, model, self.run.rt)
                self.state = jax.device_put(state, self.shardings)

    def _init_from(self, path):
        """A converted HF checkpoint or another run (workdir, checkpoints/ or a step): its model
        variables only, in this experiment's dtypes, read straight onto this run's shardings."""
        src_cfg, src_rt = peek_config(Path(path))
        if (got := load_special_tokens(Path(path))).known():  # they belong with these weights
            self.special_tokens = got
        bad = _config_mismatch(config_to_dict(src_cfg), self.cfg)
        if bad:
            raise CheckpointError(f"init_from {path}: incompatible model config: {bad}")
        if src_rt.scan_layers != self.run.rt.scan_layers:
            raise CheckpointError(f"init_from {path}: its layers are stored with scan_layers={src_rt.scan_layers}; "
                                  f"set model.runtime.scan_layers={str(src_rt.scan_layers).lower()} for this run")
        shardings = flat_shardings(self.cfg, self.run.rt, self.run.mesh, self.run.rules)
        _, flat, _ = load_any(Path(path), shardings)
        print(f"llama4-jax: initialised params from {path}", flush=True)
        return model_from_flat(self.cfg, flat, self.run.rt)

    def restore_or_init(self) -> int:
        """→ the global step to continue from (0 for a fresh run)."""
        if self.state is not None:  # nothing to restore: setup initialised it
            return 0
        got = self.ckpt.restore_latest(self.abstract, self._check_meta)
        if got is None:
            self.init_fresh()
            return 0
        self.state = got.state
        try:
            self.data.set_state(got.data_state)
        except DataError as e:  # e.g. the sources changed since the checkpoint
            raise CheckpointError(f"{self.ckpt.step_dir(got.step)}: {e}") from None
        self.saved_mixture = got.meta.get("mixture")
        if META_TOKENS_KEY in got.meta:
            self.special_tokens = SpecialTokens.from_dict(got.meta[META_TOKENS_KEY])
        step = int(got.meta["data_step"])
        if step != self.data.step:
            raise CheckpointError(f"{self.ckpt.step_dir(got.step)}: data state is at step "
                                           f"{self.data.step}, meta at {step}")
        print(f"llama4-jax: resumed from {self.ckpt.step_dir(got.step)} (stage {got.meta['stage']}, "
              f"step {got.meta['step_in_stage']} of it)", flush=True)
        return step

    def _check_meta(self, step: int, meta: dict) -> None:
        bad = _config_mismatch(meta.get("model_config", {}), self.cfg)
        if bad:
            raise CheckpointError(f"{self.ckpt.step_dir(step)}: incompatible model config: {bad}")

    @staticmethod
    def step_key(plan) -> tuple:
        """Which compiled train step runs `plan`."""
        return plan.microbatches, plan.rope_scaling

    def media_step(self, batch, plan, train: bool = True):
        """The jitted train (or eval) step for `batch`: the text program for a text-only batch,
        else the one compiled for its media fields (made on first use)."""
        fields = media_fields(batch)
        key = self.step_key(plan) if train else plan.rope_scaling
        if not fields:
            return (self.train_steps if train else self.eval_steps)[key]
        if (train, fields, key) not in self._media_steps:
            shard_in = parallel.batch_shardings(self.batch_sharding, batch_ranks(fields))
            if train:
                step = jax.jit(self._step_fns[key], in_shardings=(self.shardings, shard_in),
                               out_shardings=(self.shardings, None), donate_argnums=0)
            else:
                step = jax.jit(self._eval_fns[key], in_shardings=(self.shardings, shard_in))
            self._media_steps[(train, fields, key)] = step
        return self._media_steps[(train, fields, key)]

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
                "model_config": config_to_dict(self.cfg), "runtime": runtime_to_dict(self.run.rt),
                "experiment": dump_resolved(self.exp), META_TOKENS_KEY: self.special_tokens.to_dict()}

    def save(self, step: int, plan) -> None:
        self.ckpt.save(step, self.state, self.data.get_state(), self.meta(step, plan))

    def close(self) -> None:
        """Waits for an in-flight save; stops the data prefetch."""
        if getattr(self, "ckpt", None) is not None:
            self.ckpt.close()
        if getattr(self, "data", None) is not None:
            self.data.close()

    def evaluate(self, plan) -> dict[str, float]:
        out = {}
        for src in self.data.eval_source_names:
            tot, cnt = 0.0, 0.0
            for b in self.data.eval_batches(src, seq_len=plan.seq_len, global_batch=plan.batch_size,
                                            max_batches=self.exp.eval.batches):
                step = self.media_step(b, plan, train=False)
                s, c = step(self.state, parallel.global_batch(b, self.batch_sharding))
                tot, cnt = tot + float(s), cnt + float(c)
            if cnt:
                out[f"eval/loss/{src}"] = tot / cnt
        if out:
            out["eval/loss"] = float(np.mean(list(out.values())))
        return out


class Status(enum.Enum):
    """How a training session ended; `exit_code` is the process's exit status."""

    DONE = "done"  # every stage trained
    PREEMPTED = "preempted"  # SIGTERM/SIGINT or LLAMA4_JAX_STOP_AT_STEP: saved, resume to continue
    NON_FINITE = "non-finite"  # optimizer.max_bad_steps consecutive non-finite steps; nothing saved

    @property
    def exit_code(self) -> int:
        return 3 if self is Status.NON_FINITE else 0


@dataclass
class Counters:
    """The loop's per-session mutable state (the model's state lives in `Trainer.state`)."""

    step: int  # global steps done
    resumed: bool  # this session continues a checkpoint (its first stage resumes the sampler)
    stage_index: int = -1  # the stage entered last; -1 before the first
    first_in_stage: bool = True  # the next step is the stage's first: it compiles, untimed
    flops_per_token: float = 0.0  # of the current stage's seq_len
    losses: list = field(default_factory=list)  # device scalars of the steps since the last row
    compile_s: dict[str, float] = field(default_factory=dict)  # first-step time per stage
    stage_losses: dict[str, list[float]] = field(default_factory=dict)  # logged losses per stage


class Loop:
    """One session's steps: next batch + train step; feed the sampler; maybe eval; log a row;
    stop on non-finite steps; maybe checkpoint; stop when preempted. Each is one method."""

    def __init__(self, run, tr: Trainer, preempt: Preemption, step: int):
        self.run, self.tr, self.preempt, self.exp = run, tr, preempt, run.exp
        self.c = Counters(step=step, resumed=step > 0)
        self.total = run.plans[-1].end
        self.stop_at = stop_at_step()
        self.writer = MetricsWriter(run.workdir, self.exp.logging.tensorboard, enabled=tr.main, resumed_at=step)
        self.peak, self.peak_how = device_peak_flops(run.rt.compute_dtype, fp8=bool(run.rt.fp8_families))
        self.writer.text("run/peak_flops_source", f"{self.peak:.4g} FLOP/s per device: {self.peak_how}", step)
        self.n_dev = jax.device_count()
        self.progress = StageProgress(enabled=self.exp.logging.progress and tr.main)
        self.clock = TrainClock()
        self.plan = stage_at(run.plans, step)
        self.prev_metrics = None  # the previous step's: its streak is read without waiting for this one

    def run_steps(self) -> Status:
        while self.c.step < self.total:
            self.plan = plan = stage_at(self.run.plans, self.c.step)
            self.enter_stage_if_new(plan)
            m = self.train_step(plan)
            self.feed_sampler(plan, m)
            self.c.step += 1
            stage_end = self.c.step == plan.end
            ev = self.maybe_evaluate(plan, stage_end)
            bad = self.too_many_bad(self.prev_metrics)
            logged = self.row_due(stage_end, ev) or bad
            if logged:
                self.log_row(plan, m, ev)
            else:
                self.progress.update(self.c.step, None)
            self.prev_metrics = m
            if bad or (logged and self.too_many_bad(m)):
                print(f"llama4-jax: stopping: {self.exp.optimizer.max_bad_steps} consecutive non-finite steps at "
                      f"step {self.c.step} (stage {plan.name}); the last good checkpoint is kept", file=sys.stderr)
                return Status.NON_FINITE
            if self.checkpoint_and_maybe_stop(plan, stage_end):
                return Status.PREEMPTED
            if stage_end:
                self.progress.finish()
        return Status.DONE

    # -- the steps of the body -----------------------------------------------------------
    def enter_stage_if_new(self, plan) -> None:
        if plan.index == self.c.stage_index:
            return
        # Resuming inside a stage continues its sampler; at a boundary the new stage starts fresh.
        self.tr.enter_stage(plan, resumed=self.c.resumed and self.c.stage_index == -1 and self.c.step > plan.start)
        self.c.stage_index, self.c.first_in_stage = plan.index, True
        self.progress.start(plan, self.c.step)
        self.c.flops_per_token = flops_lib.flops_per_token(self.run.cfg, plan.seq_len)

    def train_step(self, plan) -> dict:
        """Next batch + one train step (dispatched, not waited for, except a stage's first: its
        time is the compilation, and the throughput clock starts after it)."""
        tr = self.tr
        batch = parallel.global_batch(next(tr.data), tr.batch_sharding)
        t0 = time.perf_counter()
        tr.state, m = tr.media_step(batch, plan)(tr.state, batch)
        if self.c.first_in_stage:
            jax.block_until_ready(m["loss"])
            self.c.compile_s[plan.name] = time.perf_counter() - t0
            self.clock.restart()
            self.c.first_in_stage = False
        else:
            self.clock.add_tokens(plan.seq_len * plan.batch_size)
        self.c.losses.append(m["loss"])
        return m

    def feed_sampler(self, plan, m) -> None:
        """The long-tail sampler sees every step's per-source losses and may reweight the mix."""
        tr = self.tr
        tr.control.observe(m["src_loss_sum"], m["src_tokens"], m["src_rows"])
        new_w = tr.control.maybe_update(self.c.step - plan.start, plan.sampler.update_every)
        if new_w is not None:
            tr.data.set_weights(new_w)

    def maybe_evaluate(self, plan, stage_end: bool) -> dict[str, float]:
        every = self.exp.eval.every_steps
        if not (every and (self.c.step % every == 0 or stage_end)):
            return {}
        with self.clock.side("eval", wait_for=self.tr.state):
            return self.tr.evaluate(plan)

    def too_many_bad(self, m) -> bool:
        """Whether `m`'s step ended `optimizer.max_bad_steps` consecutive non-finite steps. The loop
        asks every step about the previous step (finished by now: the device is not waited for)
        and about this one when its row has brought it to the host: at most one step late."""
        return m is not None and int(m["bad_streak"]) >= self.exp.optimizer.max_bad_steps

    def row_due(self, stage_end: bool, ev: dict) -> bool:
        return self.c.step % self.exp.logging.every_steps == 0 or stage_end or bool(ev)  # eval shares the row

    def log_row(self, plan, m, ev: dict) -> None:
        tr, step = self.tr, self.c.step
        m = jax.device_get(m)
        names = tr.data.source_names
        scalars = {"loss": float(np.mean([float(x) for x in jax.device_get(self.c.losses)])),
                   "grad_norm": float(m["grad_norm"]), "moe_loss": float(m["moe_loss"])}
        for i, n in enumerate(names):
            if m["src_tokens"][i] > 0:
                scalars[f"loss/{n}"] = float(m["src_loss_sum"][i] / m["src_tokens"][i])
        moe = moe_log(m, self.run.cfg.moe_layers, names, m["src_tokens"])
        scalars.update(moe.scalars)
        scalars.update(ev)
        if not bool(m["finite"]) or int(m["bad_streak"]) > 0:
            log.warning("step %d (stage %s): non-finite loss or gradient; step skipped "
                        "(%d skipped so far)", step, plan.name, int(tr.state.skipped))
        tps, side_s = self.clock.row()
        if tps is not None:
            scalars["tokens_per_s"] = tps
            scalars["mfu"] = self.c.flops_per_token * tps / (self.peak * self.n_dev)
        scalars.update(side_s)
        scalars.update(stage=plan.name, stage_index=plan.index,
                       lr=float(self.run.schedule(int(tr.state.step) - 1 if int(tr.state.step) else 0)),
                       skipped_steps=int(tr.state.skipped))
        for k, v in (tr.control.sampler.weights().items() if tr.control.sampler else []):
            scalars[f"mixture/{k}"] = v
        self.writer.write(step, scalars, moe.histograms, moe.images)
        self.c.stage_losses.setdefault(plan.name, []).append(scalars["loss"])
        self.progress.update(step, scalars["loss"])
        self.c.losses = []

    def checkpoint_and_maybe_stop(self, plan, stage_end: bool) -> bool:
        """Save when due or asked (SIGUSR1, preemption); → True when a preemption ends the run,
        after its checkpoint has landed."""
        step, preempt, tr = self.c.step, self.preempt, self.tr
        if step == self.stop_at:
            preempt.requested = True
            print(f"llama4-jax: {STOP_ENV}={self.stop_at} reached", file=sys.stderr, flush=True)
        preempt.agree()
        stop = preempt.requested  # read once: a signal arriving now waits for the next step
        if (step % self.exp.checkpoint.every_steps == 0 or stage_end or step == self.total
                or stop or preempt.save_requested):
            with self.clock.side("checkpoint", wait_for=tr.state):
                tr.save(step, plan)
            preempt.save_requested = False
        if stop:
            tr.ckpt.wait()
            print(f"llama4-jax: preempted; checkpoint saved at step {step} "
                  f"({tr.ckpt.step_dir(step)})", file=sys.stderr, flush=True)
        return stop

    def close(self) -> None:
        self.progress.close()
        self.writer.close()

    def summary(self) -> None:
        print(f"llama4-jax: done. workdir {self.run.workdir}")
        for name, ls in self.c.stage_losses.items():
            if ls:
                print(f"  stage {name:<10} loss {ls[0]:.3f} → {ls[-1]:.3f}   "
                      f"(first-step compile {self.c.compile_s.get(name, 0):.1f}s)")
        print(f"  device peak {self.peak / 1e9:.1f} GFLOP/s per device ({self.peak_how})")


def train_loop(run) -> int:
    logging.basicConfig(level=logging.WARNING, format="llama4-jax: %(message)s")
    preempt = Preemption()  # from the start: a SIGTERM while compiling still ends in a clean save
    try:
        return _train(run, preempt).exit_code
    finally:
        preempt.restore()


def _train(run, preempt: Preemption) -> Status:
    tr = Trainer(run)
    created = new_workdir_paths(run.exp.data, run.workdir)  # the token store may appear in setup
    try:
        tr.setup()  # data errors surface here, before the workdir is touched
        step = tr.restore_or_init()
    except BaseException:
        tr.close()
        for path in created:  # a user error leaves the workdir as it was
            shutil.rmtree(path, ignore_errors=True)
        raise
    if tr.main:
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / "config.resolved.yaml").write_text(dump_resolved(run.exp))
        _trim_metrics(run.workdir / "metrics.jsonl", step)
    loop = None
    try:
        loop = Loop(run, tr, preempt, step)
        with jax.set_mesh(run.mesh):
            status = loop.run_steps()
    except jax.errors.JaxRuntimeError as e:
        if not is_oom(e):
            raise
        dev = jax.devices()[0]
        raise oom_error(e, what="the train step or eval", plan=loop.plan, remat=run.rt.remat,
                        devices=f"{jax.device_count()} {dev.platform} device(s) ({dev.device_kind})") from None
    finally:
        if loop is not None:
            loop.close()
        tr.close()  # waits for an in-flight save: the checkpoints stay whole whatever ended the run
    if getattr(tr, "data", None) is not None:  # every process: what it read itself
        stats = tr.data.read_stats()
        print(f"llama4-jax: data: process {jax.process_index()} built {stats['rows']} rows, read "
              f"{stats['records']} store records", flush=True)
    if status is Status.DONE:
        loop.summary()
    return status

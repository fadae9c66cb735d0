"""The training loop proper: stages, steps, logging, eval, checkpoints, preemption.

Resume: with `--resume auto` the newest checkpoint that restores is continued (onto this run's
mesh); the global step it holds decides the stage, the mixture and the next batch, so a resumed
run is bit for bit the one that never stopped (same mesh) and metrics.jsonl loses the rows a
killed run logged past its last checkpoint. Checkpoints: every `checkpoint.every_steps`, at every
stage end, at the last step, on SIGUSR1 (carry on) and on SIGTERM/SIGINT (then exit 0).
`LLAMA4_JAX_STOP_AT_STEP=k` (tests, debugging) stops like a SIGTERM right after global step k.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jax.experimental import multihost_utils

from .. import parallel
from ..config import dump_resolved
from ..errors import CheckpointError, ConfigError, DataError
from ..model import flops as flops_lib
from ..model.special_tokens import SpecialTokens
from ..model.store import (META_TOKENS_KEY, config_from_dict, config_to_dict, flat_shardings, load_any,
                           load_special_tokens, model_from_flat, peek_config, runtime_to_dict)
from . import checkpoint as ckpt_lib
from .curriculum import MixtureControl, stage_at
from .metrics import MetricsWriter, device_peak_flops
from .progress import StageProgress
from .run import build_data, init_sharded
from .state import abstract_state, init_state
from .step import StepConfig, make_eval_step, make_train_step

log = logging.getLogger("llama4_jax")


STOP_ENV = "LLAMA4_JAX_STOP_AT_STEP"  # tests/debugging: behave as if preempted after this global step


class Preemption:
    """SIGTERM/SIGINT: finish the step, save, wait for the save, exit 0. A second SIGINT aborts
    at once (os._exit: no save; the last complete checkpoint stays the one to resume from).
    SIGUSR1: save a checkpoint after this step and carry on (checkpoint on demand)."""

    def __init__(self):
        self.requested = False
        self.save_requested = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR1:
            self.save_requested = True
            return
        if self.requested and signum == signal.SIGINT:
            print("llama4-jax: second interrupt, aborting without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print(f"llama4-jax: {signal.Signals(signum).name} received; saving a checkpoint after this step "
              "(interrupt again to abort without saving)", file=sys.stderr, flush=True)

    def agree(self) -> None:
        """With several processes, a request any of them received holds for all (signals reach
        processes at different steps; saving is collective, so they must stop at the same one)."""
        if jax.process_count() == 1:
            return
        mine = np.array([self.requested, self.save_requested], np.int32)
        req, save = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2).max(axis=0)
        self.requested, self.save_requested = bool(req), bool(save)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stop_at_step() -> int | None:
    v = os.environ.get(STOP_ENV)
    return int(v) if v else None


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
        self.tokenizer, self.data = build_data(exp, self.plans)
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
        chunk_rows = exp.loss.chunk_rows
        # One jitted step per microbatch count the curriculum uses (the count is static: it sets
        # the scan length); train_step is the first stage's (bench and tools time that one).
        self.train_steps = {n: jax.jit(make_train_step(graphdef, tx, StepConfig(
                                len(self.data.source_names), self.run.balancing, chunk_rows, n)),
                                in_shardings=(self.shardings, self.batch_sharding),
                                out_shardings=(self.shardings, None), donate_argnums=0)
                            for n in sorted({p.microbatches for p in self.plans})}
        self.train_step = self.train_steps[self.plans[0].microbatches]
        self.eval_step = jax.jit(make_eval_step(graphdef, chunk_rows),
                                 in_shardings=(self.shardings, self.batch_sharding))
        self.control = MixtureControl(self.data.source_names)
        self.saved_mixture = None
        if not (self.run.resume == "auto" and self.ckpt.steps()):
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
    preempt = Preemption()  # from the start: a SIGTERM while compiling still ends in a clean save
    try:
        return _train(run, preempt)
    finally:
        preempt.restore()


def _train(run, preempt: Preemption) -> int:
    tr = Trainer(run)
    try:
        tr.setup()  # data errors surface here, before the workdir is touched
        step = tr.restore_or_init()
    except BaseException:
        tr.close()
        raise
    workdir = run.workdir
    if tr.main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.resolved.yaml").write_text(dump_resolved(run.exp))
        _trim_metrics(workdir / "metrics.jsonl", step)
    exp, plans, cfg = run.exp, run.plans, run.cfg
    total = plans[-1].end
    stop_at = _stop_at_step()
    writer = MetricsWriter(workdir, exp.logging.tensorboard, enabled=tr.main, resumed_at=step)
    peak, peak_how = device_peak_flops(run.rt.compute_dtype)
    n_dev = jax.device_count()
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
                tr.state, m = tr.train_steps[plan.microbatches](tr.state, batch)
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
                do_eval = exp.eval.every_steps and (step % exp.eval.every_steps == 0 or stage_end)
                ev = tr.evaluate(plan) if do_eval else {}
                if step % exp.logging.every_steps == 0 or stage_end or ev:  # eval shares the row
                    scalars, hists = _log_scalars(m, tr.data.source_names, losses)
                    scalars.update(ev)
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
                    if int(tr.state.bad_streak) >= exp.optimizer.max_bad_steps:
                        print(f"llama4-jax: stopping: {exp.optimizer.max_bad_steps} consecutive non-finite steps at step "
                              f"{step} (stage {plan.name}); the last good checkpoint is kept", file=sys.stderr)
                        return 3
                else:
                    progress.update(step, None)
                if step == stop_at:
                    preempt.requested = True
                    print(f"llama4-jax: {STOP_ENV}={stop_at} reached", file=sys.stderr, flush=True)
                preempt.agree()
                stop = preempt.requested  # read once: a signal arriving now waits for the next step
                if (step % exp.checkpoint.every_steps == 0 or stage_end or step == total
                        or stop or preempt.save_requested):
                    tr.save(step, plan)
                    preempt.save_requested = False
                if stop:
                    tr.ckpt.wait()
                    print(f"llama4-jax: preempted; checkpoint saved at step {step} "
                          f"({tr.ckpt.step_dir(step)})", file=sys.stderr, flush=True)
                    return 0
                if stage_end:
                    progress.finish()
    finally:
        progress.close()
        tr.close()
        writer.close()
    _summary(workdir, stage_losses, compile_s, peak, peak_how)
    return status


def _summary(workdir: Path, stage_losses, compile_s, peak, peak_how):
    print(f"llama4-jax: done. workdir {workdir}")
    for name, ls in stage_losses.items():
        if ls:
            print(f"  stage {name:<10} loss {ls[0]:.3f} → {ls[-1]:.3f}   (first-step compile {compile_s.get(name, 0):.1f}s)")
    print(f"  device peak {peak / 1e9:.1f} GFLOP/s per device ({peak_how})")

"""How long an async checkpoint save blocks the training loop, as a fraction of a train step.

    python tools/bench_ckpt.py experiments/bench_cpu.yaml --saves 3 --steps-between 3

Builds the experiment's real Trainer (model, optimizer state, data iterator, jitted step) in a
temporary workdir and times, after warm-up:
  - step:      a train step alone (median, blocked until its outputs are ready);
  - blocked:   `Trainer.save` with async saving on — what the loop waits for: device→host copy
               of the whole train state, Orbax's bookkeeping, and the wait for the previous
               save if it is still writing (the loop saves no more often than every
               `--steps-between` steps here);
  - steps during write: the median step while the background write runs (it shares the host);
  - write:     one save with no steps running, from the call until the checkpoint is committed;
  - sync:      the same save with async saving off, for comparison.
The stall is blocked / step; the steps-during-write slowdown is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llama4_jax.parallel.hostmem import tune_host_allocator

tune_host_allocator()  # as the `llama4-jax` CLI does, before JAX starts

import jax  # noqa: E402


def _trainer(experiment: str, overrides: list[str], workdir: str, async_save: bool):
    from llama4_jax.train.loop import Trainer
    from llama4_jax.train.run import Run

    sets = [*overrides, f"checkpoint.async_save={str(async_save).lower()}", "checkpoint.keep_last=2"]
    run = Run(experiment, overrides=sets, workdir=workdir, resume="never")
    tr = Trainer(run)
    tr.setup()
    tr.restore_or_init()
    plan = run.plans[0]
    tr.enter_stage(plan, resumed=False)
    return run, tr, plan


def _step(run, tr):
    from llama4_jax import parallel

    batch = parallel.global_batch(next(tr.data), tr.batch_sharding)
    t = time.perf_counter()
    tr.state, m = tr.train_step(tr.state, batch)
    jax.block_until_ready((tr.state, m))
    return time.perf_counter() - t


def bench(experiment: str, overrides: list[str], saves: int, steps_between: int, warmup: int) -> dict:
    out: dict = {}
    for mode in ("async", "sync"):
        with tempfile.TemporaryDirectory() as tmp:
            run, tr, plan = _trainer(experiment, overrides, tmp, async_save=mode == "async")
            with jax.set_mesh(run.mesh):
                for _ in range(warmup):
                    _step(run, tr)
                plain = [_step(run, tr) for _ in range(steps_between)]
                blocked, during, n = [], [], warmup + steps_between
                for _ in range(saves):
                    t0 = time.perf_counter()
                    tr.save(n, plan)
                    blocked.append(time.perf_counter() - t0)
                    for _ in range(steps_between):
                        busy = tr.ckpt.manager.is_saving_in_progress()
                        dt = _step(run, tr)
                        (during if busy else plain).append(dt)
                        n += 1
                    tr.ckpt.wait()
                t0 = time.perf_counter()  # one save with nothing else running: the write itself
                tr.save(n, plan)
                tr.ckpt.wait()
                write = time.perf_counter() - t0
            state_bytes = sum(x.nbytes for x in jax.tree.leaves(tr.state))
            tr.ckpt.close()
            tr.data.close()
        step = statistics.median(plain)
        out[mode] = {"step_s": step, "blocked_s": statistics.median(blocked), "blocked_all_s": blocked,
                     "stall_fraction": statistics.median(blocked) / step,
                     "step_during_write_s": statistics.median(during) if during else None,
                     "steps_during_write": len(during), "write_s": write}
    out.update(experiment=experiment, overrides=overrides, state_bytes=state_bytes,
               batch=plan.batch_size, seq_len=plan.seq_len, device=jax.devices()[0].device_kind,
               n_devices=jax.device_count(), cpus=len(os.sched_getaffinity(0)), machine=platform.processor()
               or platform.machine(), jax=jax.__version__)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", default="experiments/bench_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--steps-between", type=int, default=3, help="train steps between two saves")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = bench(args.experiment, args.overrides, args.saves, args.steps_between, args.warmup)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"{r['experiment']}: batch {r['batch']} x {r['seq_len']}, train state {r['state_bytes'] / 2**20:.1f} MiB, "
          f"{r['n_devices']} x {r['device']} ({r['cpus']} CPUs), jax {r['jax']}")
    print("| save | step (ms) | loop blocked by save (ms) | stall / step | step while writing (ms) | write until committed (ms) |")
    print("|---|---|---|---|---|---|")
    for mode in ("async", "sync"):
        m = r[mode]
        during = f"{m['step_during_write_s'] * 1e3:.0f}" if m["step_during_write_s"] else "–"
        print(f"| {mode} | {m['step_s'] * 1e3:.0f} | {m['blocked_s'] * 1e3:.0f} | {m['stall_fraction']:.2f} | "
              f"{during} | {m['write_s'] * 1e3:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

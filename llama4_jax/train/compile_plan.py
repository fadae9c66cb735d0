"""`llama4-jax train EXP --dry-run --compile`: the compiler's own memory figures for the real step.

The dry run's estimate counts state bytes from shapes and shardings. This lowers and compiles the
actual jitted train step (abstract arguments with the real shardings: nothing is allocated) and
reads XLA's per-device memory analysis: arguments, outputs, temporaries (activations, gradients,
the saved residuals remat did not drop, the logits), generated code. That is what decides whether
a launch survives its first step.

The compile runs in a child process (`python -m llama4_jax.train.compile_plan`), for two
reasons: on CPU the child starts JAX with as many fake devices as the mesh needs
(`--xla_force_host_platform_device_count`), which a process whose backend already started
cannot do; and a compile that overruns `--compile-timeout` is killed cleanly (XLA's compile
cannot be interrupted from Python). On an accelerator host with enough devices the child uses
the real ones.

The verdict compares arguments + outputs − aliased (donated) + temporaries + code with the
per-device budget: `mesh.device_memory_gb`, else a known default for the device kind.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax

from .. import parallel
from ..errors import RunError
from .checkpoint import abstract_with_shardings
from .run import Run
from .state import abstract_state
from .step import BATCH_RANKS, StepConfig, make_train_step

# Per-device memory of common accelerators (GB as the vendors quote them: 1e9 bytes).
DEVICE_MEMORY_GB = {"H100": 80, "H200": 141, "A100": 80, "B200": 192, "TPU v4": 32, "TPU v5p": 95,
                    "TPU v5 lite": 16, "TPU v6 lite": 32}


def _batch_structs(plan, sharding):
    """The step's batch as ShapeDtypeStructs on the batch sharding (the data pipeline's format)."""
    shape = {2: (plan.batch_size, plan.seq_len), 1: (plan.batch_size,)}
    return {k: jax.ShapeDtypeStruct(shape[r], "float32" if k == "loss_mask" else "int32",
                                    sharding=parallel.for_rank(sharding, r)) for k, r in BATCH_RANKS.items()}


def analyse(experiment: str, overrides, devices: int) -> dict:
    """Compile the step of the stage with the most tokens per device on this process's devices."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(experiment, overrides=overrides, workdir=tmp, resume="auto", devices=jax.devices()[:devices])
    plan = max(run.plans, key=lambda p: p.seq_len * p.batch_size)
    with jax.set_mesh(run.mesh):
        graphdef, abstract, tx = abstract_state(run.cfg, run.make_tx, run.rt)
        shardings = parallel.tree_shardings(abstract, run.mesh, run.rules)
        batch_sharding = parallel.batch_sharding(run.mesh, run.rules)
        step = make_train_step(graphdef, tx, StepConfig(num_sources=len(run.exp.data.sources), balancing=run.balancing,
                                                        loss_chunk_rows=run.exp.loss.chunk_rows,
                                                        microbatches=plan.microbatches))
        jitted = jax.jit(step, in_shardings=(shardings, parallel.batch_shardings(batch_sharding, BATCH_RANKS)), out_shardings=(shardings, None),
                         donate_argnums=0)
        lowered = jitted.lower(abstract_with_shardings(abstract, shardings), _batch_structs(plan, batch_sharding))
        compiled = lowered.compile()
    ma = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): int(getattr(ma, f)) for f in fields}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    out.update(stage=plan.name, seq_len=plan.seq_len, batch_size=plan.batch_size, devices=devices)
    return out


def budget_bytes(device_memory_gb: float | None, device_kind: str | None) -> tuple[float | None, str]:
    """(bytes per device, where the number comes from) or (None, why there is none)."""
    if device_memory_gb:
        return device_memory_gb * 1e9, "mesh.device_memory_gb"
    for kind, gb in sorted(DEVICE_MEMORY_GB.items(), key=lambda kv: -len(kv[0])):
        if device_kind and kind.lower() in device_kind.lower():
            return gb * 1e9, f"{kind} default"
    return None, "no budget: set mesh.device_memory_gb"


def compiled_memory(experiment: str, overrides, devices: int, timeout_s: float) -> dict:
    """Run `analyse` in a child process with `devices` (fake, on CPU) devices; RunError on a
    failure or a timeout, naming it."""
    env = dict(os.environ)
    if jax.default_backend() == "cpu":
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    elif jax.device_count() < devices:
        raise RunError(f"--compile needs {devices} devices for this mesh; this host has {jax.device_count()} "
                       f"{jax.devices()[0].platform} devices (plan on a CPU host, where devices can be faked)")
    cmd = [sys.executable, "-m", "llama4_jax.train.compile_plan", str(experiment), "--devices", str(devices),
           *[a for o in overrides for a in ("--set", o)]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RunError(f"--compile: compiling the train step for {devices} devices took longer than "
                       f"{timeout_s:.0f} s (raise --compile-timeout)") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RunError(f"--compile: compiling the train step failed: {last[:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(mem: dict, device_memory_gb: float | None, device_kind: str | None) -> list[str]:
    fmt = parallel.format_bytes
    budget, source = budget_bytes(device_memory_gb, device_kind)
    lines = [f"compiled step (stage {mem['stage']}, {mem['batch_size']}×{mem['seq_len']}, {mem['devices']} devices), "
             f"per device: arguments {fmt(mem['argument'])}, outputs {fmt(mem['output'])} "
             f"({fmt(mem['alias'])} donated), temporaries {fmt(mem['temp'])}, code {fmt(mem['generated_code'])}; "
             f"total {fmt(mem['total'])}"]
    if budget is None:
        lines.append(f"memory verdict: {source}")
    else:
        ok = mem["total"] <= budget
        lines.append(f"memory verdict: {'fits' if ok else 'DOES NOT FIT'} — {fmt(mem['total'])} of "
                     f"{fmt(budget)} per device ({source}, {100 * mem['total'] / budget:.0f}%)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama4_jax.train.compile_plan")
    p.add_argument("experiment")
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    if jax.device_count() < args.devices:
        raise SystemExit(f"needs {args.devices} devices, has {jax.device_count()}")
    print(json.dumps(analyse(args.experiment, args.overrides, args.devices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

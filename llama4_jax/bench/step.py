"""`llama4-jax bench`: time the real jitted train step of an experiment, side by side with a peer.

Reported: compile time (separately), median step time after warm-up, tokens/s, model FLOPs per
token (active experts only, attention counted as what it computes), MFU against a peak measured
in the same run on CPU (or the published dense peak of the accelerator), peak memory, the data
pipeline's own throughput, and optionally (`--peer hf`) the same shape trained with Hugging Face
transformers' Llama4ForCausalLM in PyTorch on the same device kind (CUDA when ours runs on a GPU
and torch has CUDA; else the CPU with as many threads, and the ratio is marked cross-device).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import jax

from .. import parallel
from ..config import load_experiment
from ..convert.hf import config_to_hf
from ..model import flops as flops_lib
from ..train.loop import Trainer
from ..train.metrics import device_peak_flops
from ..train.run import Run
from .profile_report import report


def _peak_memory_bytes() -> tuple[float, str]:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return float(stats["peak_bytes_in_use"]), f"{dev.platform} peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "host max RSS"


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_ours(experiment: str, overrides: list[str], steps: int, warmup: int, profile_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(experiment, overrides=list(overrides), workdir=tmp, resume="never")
        tr = Trainer(run)
        tr.setup()
        plan = run.plans[0]
        tr.enter_stage(plan, resumed=False)
        # Data loading: how fast the pipeline alone produces batches (tokens/s), off the step.
        t = time.perf_counter()
        n_prof = 2 if profile_dir else 0
        local = [next(tr.data) for _ in range(warmup + steps + n_prof + 1)]
        data_s = (time.perf_counter() - t) / len(local)
        with jax.set_mesh(run.mesh):
            batches = [parallel.global_batch(b, tr.batch_sharding) for b in local]
            t = time.perf_counter()
            compiled = tr.train_step.lower(tr.state, batches[0]).compile()
            compile_s = time.perf_counter() - t
            state = tr.state
            for b in batches[:warmup]:
                state, m = compiled(state, b)
            jax.block_until_ready(state)
            times = []
            for b in batches[warmup:warmup + steps]:
                t = time.perf_counter()
                state, m = compiled(state, b)
                jax.block_until_ready((state, m))
                times.append(time.perf_counter() - t)
            if profile_dir:
                profile = _profile(compiled, state, batches[warmup + steps:warmup + steps + n_prof], profile_dir)
        tr.ckpt.close()
        tr.data.close()
    step_s = statistics.median(times)
    tokens = plan.seq_len * plan.batch_size
    fpt = flops_lib.flops_per_token(run.cfg, plan.seq_len)
    peak, peak_how = device_peak_flops(run.rt.compute_dtype, fp8=bool(run.rt.fp8_families))
    mem, mem_how = _peak_memory_bytes()
    tps = tokens / step_s
    total, active = flops_lib.param_counts(run.cfg)
    extra = {"profile": profile} if profile_dir else {}
    return {**extra, "experiment": experiment, "device": jax.devices()[0].device_kind,
            "platform": jax.devices()[0].platform, "n_devices": jax.device_count(),
            "jax": jax.__version__, "batch": plan.batch_size, "seq_len": plan.seq_len,
            "params_total": total, "params_active": active, "compile_s": compile_s, "step_s": step_s,
            "step_s_all": times, "tokens_per_s": tps, "flops_per_token": fpt, "peak_flops": peak,
            "peak_flops_source": peak_how, "mfu": fpt * tps / (peak * jax.device_count()),
            "peak_memory_bytes": mem, "peak_memory_source": mem_how,
            "data_tokens_per_s": tokens / data_s, "data_vs_step": (tokens / data_s) / tps}


def _profile(compiled, state, batches, out_dir: str) -> str:
    """Trace `batches` steps into out_dir (plus the step's HLO); → the per-source time table."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hlo = compiled.as_text()
    (out / "train_step.hlo.txt").write_text(hlo)
    jax.profiler.start_trace(str(out), create_perfetto_trace=True)
    for b in batches:
        state, m = compiled(state, b)
    jax.block_until_ready((state, m))
    jax.profiler.stop_trace()
    return report(out, hlo, len(batches))


def peer_device(our_platform: str, cuda_available: bool) -> str:
    """The torch device for the peer: CUDA when ours runs on a GPU and torch has one, else the CPU
    (then the ratio compares devices, not implementations, and is labelled cross-device)."""
    return "cuda" if our_platform == "gpu" and cuda_available else "cpu"


def cross_device(our_platform: str, peer: str) -> bool:
    return {"gpu": "cuda"}.get(our_platform, our_platform) != peer


def bench_hf_peer(cfg, batch: int, seq_len: int, steps: int, threads: int, device: str = "cpu") -> dict:
    """The same shape in HF transformers (PyTorch on `device`): AdamW, fwd+bwd+step, median step time."""
    import torch
    from transformers import Llama4ForCausalLM, Llama4TextConfig


    torch.set_num_threads(threads)
    hf_cfg = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = Llama4ForCausalLM(Llama4TextConfig(**hf_cfg)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # CUDA kernels run async

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sync()

    step()  # warm-up
    times = _time(step, steps)
    s = statistics.median(times)
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {threads} threads"
    return {"peer": f"transformers Llama4ForCausalLM (torch {torch.__version__}, {where})", "peer_device": device,
            "peer_step_s": s, "peer_step_s_all": times, "peer_tokens_per_s": batch * seq_len / s}


def _peer(args, out: dict) -> dict:
    """The HF peer on the device kind ours ran on (where torch has it), and the ratio."""
    import torch

    cfg = load_experiment(args.experiment, args.overrides).to_model_config()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = peer_device(out["platform"], torch.cuda.is_available())
    got = bench_hf_peer(cfg, out["batch"], out["seq_len"], args.peer_steps, threads, device)
    return {**got, "ratio": out["tokens_per_s"] / got["peer_tokens_per_s"],
            "ratio_cross_device": cross_device(out["platform"], device)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llama4-jax bench", description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", default="experiments/bench_cpu.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peer", choices=["none", "hf"], default="none")
    p.add_argument("--peer-steps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="also trace 2 steps into DIR (jax.profiler + the step's HLO) and print where the time goes")
    args = p.parse_args(argv)
    out = bench_ours(args.experiment, args.overrides, args.steps, args.warmup, args.profile)
    if args.peer == "hf":
        out.update(_peer(args, out))
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(out)
        if "profile" in out:
            print(f"\nprofile ({args.profile}):\n{out['profile']}")
    return 0


def _print_table(o: dict) -> None:
    rows = [("device", f"{o['device']} × {o['n_devices']} (jax {o['jax']})"),
            ("shape", f"batch {o['batch']} × seq {o['seq_len']}; params {o['params_total']:,} total, "
                      f"{o['params_active']:,} active"),
            ("compile", f"{o['compile_s']:.1f} s"), ("step (median)", f"{o['step_s'] * 1e3:.1f} ms"),
            ("tokens/s", f"{o['tokens_per_s']:,.0f}"), ("FLOPs/token", f"{o['flops_per_token']:.4g}"),
            ("peak", f"{o['peak_flops'] / 1e9:,.1f} GFLOP/s ({o['peak_flops_source']})"),
            ("MFU", f"{o['mfu'] * 100:.1f}%"),
            ("peak memory", f"{o['peak_memory_bytes'] / 2**20:,.0f} MiB ({o['peak_memory_source']})"),
            ("data pipeline", f"{o['data_tokens_per_s']:,.0f} tokens/s ({o['data_vs_step']:.1f}× the step)")]
    if "ratio" in o:
        cross = ""
        if o["ratio_cross_device"]:  # e.g. ours on a GPU, torch without CUDA: not a like-for-like ratio
            cross = f" (cross-device: ours on {o['platform']}, peer on {o['peer_device']})"
        rows += [("peer", o["peer"]), ("peer tokens/s", f"{o['peer_tokens_per_s']:,.0f}"),
                 ("ours / peer", f"{o['ratio']:.2f}×{cross}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")

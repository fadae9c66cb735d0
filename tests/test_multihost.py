"""Two processes on 127.0.0.1 (2 fake CPU devices each, gloo collectives) train like one process
with 4 devices; a killed process takes the other one down within a bounded time.

Everything runs as real `llama4-jax train` processes (`cli.main`; only the peak-FLOP/s measurement
is stubbed), set up only through the environment
(`LLAMA4_JAX_COORDINATOR`, `..._NUM_PROCESSES`, `..._PROCESS_ID`), as on a cluster. No
persistent compilation cache: a process that loads its step from a cache while its peer compiles
would wait at the first gloo collective longer than gloo's 30 s rendezvous allows.
"""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
from train_fixtures import write_small_experiment

HEARTBEAT_S = 10
# A survivor exits within the heartbeat timeout plus the coordination service's polling and the
# process teardown; 30 s of slack covers a loaded 2-core machine.
EXIT_BOUND_S = HEARTBEAT_S + 30


# `python -m llama4_jax` minus the peak-FLOP/s measurement (seconds of matmuls in every process
# that only feed the MFU column).
TRAIN = ("import sys\n"
         "from llama4_jax.train import loop\n"
         "loop.device_peak_flops = lambda *a, **kw: (1e12, 'test')\n"
         "from llama4_jax.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_core_dumps():  # the survivor aborts (SIGABRT): no core file in the test directory
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    write_small_experiment(tmp, "{data: 2, fsdp: 2}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLAMA4_JAX_", "JAX_", "XLA_FLAGS", "SLURM_", "OMPI_"))}
    # Backend optimisation off: compiles take half as long; every run compared shares the flag.
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    return tmp, env


def _train(tmp, env, workdir, *sets, devices, process=None, port=None):
    argv = [sys.executable, "-c", TRAIN, "train", str(tmp / "exp.yaml"), "--workdir", str(tmp / workdir)]
    for s in sets:
        argv += ["--set", s]
    env = {**env, "JAX_NUM_CPU_DEVICES": str(devices)}
    if process is not None:
        env.update(LLAMA4_JAX_COORDINATOR=f"127.0.0.1:{port}", LLAMA4_JAX_NUM_PROCESSES="2",
                   LLAMA4_JAX_PROCESS_ID=str(process), LLAMA4_JAX_HEARTBEAT_TIMEOUT=str(HEARTBEAT_S),
                   LLAMA4_JAX_INIT_TIMEOUT="120", LLAMA4_JAX_SHUTDOWN_TIMEOUT="60")
    log = open(tmp / f"{workdir}.{process if process is not None else 'single'}.log", "w")
    return subprocess.Popen(argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=_no_core_dumps), log.name


def _losses(path):
    rows = [json.loads(l) for l in open(path)]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _read_stats(log) -> dict[int, tuple[int, int]]:
    """{process: (rows built, store records read)} from the end-of-run data lines of a log."""
    found = re.findall(r"llama4-jax: data: process (\d+) built (\d+) rows, read (\d+) store records",
                       open(log).read())
    return {int(p): (int(rows), int(records)) for p, rows, records in found}


def test_two_processes_train_like_one_with_four_devices(setup):
    """On the token store (auto-prepared into each workdir): the same losses, and each process
    builds only its half of every batch and reads only the store records those rows need (no
    prefetch, so every count is of rows actually trained on)."""
    tmp, env = setup
    single, single_log = _train(tmp, env, "single", "data.prefetch=0", devices=4)
    assert single.wait(timeout=400) == 0, open(single_log).read()[-3000:]
    port = _free_port()
    procs = [_train(tmp, env, "two", "data.prefetch=0", devices=2, process=i, port=port) for i in (0, 1)]
    for p, log in procs:
        assert p.wait(timeout=400) == 0, open(log).read()[-3000:]
    assert "process 0 of 2 via 127.0.0.1" in open(procs[0][1]).read()
    steps, want = _losses(tmp / "single" / "metrics.jsonl")
    got_steps, got = _losses(tmp / "two" / "metrics.jsonl")  # written by process 0 alone: one row per step
    assert steps == got_steps == [1, 2, 3, 4, 5]
    for step, (a, b) in enumerate(zip(want, got), 1):
        assert abs(a - b) <= 1e-5, (step, a, b)
    # the final checkpoint was written collectively (both processes' shards, one step directory)
    assert (tmp / "two" / "checkpoints" / "5").is_dir()
    assert (tmp / "two" / "data-cache" / "prose" / "manifest.json").is_file()
    (rows, records), = _read_stats(single_log).values()
    halves = {**_read_stats(procs[0][1]), **_read_stats(procs[1][1])}
    assert rows == 5 * 8 and set(halves) == {0, 1}
    assert [r for r, _ in halves.values()] == [rows // 2] * 2
    assert sum(rec for _, rec in halves.values()) == records and all(0 < rec < records for _, rec in halves.values())


def test_killed_process_makes_the_other_exit(setup):
    tmp, env = setup
    port = _free_port()
    procs = [_train(tmp, env, "kill", "curriculum.stages[0].steps=100000", devices=2, process=i, port=port)
             for i in (0, 1)]
    (p0, log0), (p1, _) = procs
    try:
        metrics = tmp / "kill" / "metrics.jsonl"
        deadline = time.monotonic() + 400
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert p0.poll() is None and p1.poll() is None, open(log0).read()[-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        p1.send_signal(signal.SIGKILL)  # mid-training: process 0 is inside the step's collectives
        t = time.monotonic()
        rc = p0.wait(timeout=EXIT_BOUND_S + 60)
        elapsed = time.monotonic() - t
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = open(log0).read()
    assert rc != 0, out[-3000:]
    assert elapsed <= EXIT_BOUND_S, (elapsed, out[-3000:])
    assert any(s in out for s in ("another task died", "detected fatal errors", "Gloo", "gloo")), out[-3000:]


FAIL_SCRIPT = r"""
import os, sys
import numpy as np
from llama4_jax.parallel import distributed
print(distributed.initialize(), flush=True)
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.asarray(jax.devices()), ("d",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.ones(2, np.float32))
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
with distributed.fail_fast():
    for i in range(10**9):
        assert float(total(x)) == 4.0  # a cross-process collective every iteration
        if i == 20 and jax.process_index() == int(os.environ["FAIL"]):
            print("raising", flush=True)
            raise RuntimeError("injected failure")
"""


@pytest.mark.parametrize("failing", [1, 0], ids=["worker-raises", "coordinator-raises"])
def test_a_process_that_raises_exits_at_once_and_stops_the_other(setup, failing):
    """`fail_fast`: no waiting in jax.distributed's shutdown barrier for a peer stuck in a collective."""
    tmp, env = setup
    port = _free_port()
    procs = []
    for i in (0, 1):
        penv = {**env, "JAX_NUM_CPU_DEVICES": "2", "FAIL": str(failing), "LLAMA4_JAX_COORDINATOR": f"127.0.0.1:{port}",
                "LLAMA4_JAX_NUM_PROCESSES": "2", "LLAMA4_JAX_PROCESS_ID": str(i),
                "LLAMA4_JAX_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S), "LLAMA4_JAX_SHUTDOWN_TIMEOUT": "300"}
        procs.append(subprocess.Popen([sys.executable, "-c", FAIL_SCRIPT], cwd=tmp, env=penv, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_no_core_dumps))
    try:
        bad, good = procs[failing], procs[1 - failing]
        before = []  # its start-up line, gloo's connection lines, maybe a warning
        while (line := bad.stdout.readline()) and line != "raising\n":
            before.append(line)
        assert line == "raising\n", "".join(before)
        assert any(l.startswith(f"process {failing} of 2 via 127.0.0.1") for l in before), "".join(before)
        t = time.monotonic()
        assert bad.wait(timeout=60) == 1
        bad_s = time.monotonic() - t
        assert good.wait(timeout=EXIT_BOUND_S + 60) != 0
        good_s = time.monotonic() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = bad.stdout.read()
    assert "RuntimeError: injected failure" in out and f"process {failing} of 2 failed (RuntimeError)" in out, out
    assert bad_s < 10, bad_s  # not the 300 s shutdown timeout
    assert good_s <= EXIT_BOUND_S, good_s

"""Multi-process start-up: `jax.distributed.initialize`, before anything touches a device.

How the processes find each other, first match wins:
  1. explicit, from the environment — every process gets the same coordinator and count and its
     own id (all local devices are used; JAX_LOCAL_DEVICE_IDS restricts them):
       LLAMA4_JAX_COORDINATOR     host:port of process 0   (or JAX_COORDINATOR_ADDRESS)
       LLAMA4_JAX_NUM_PROCESSES   number of processes       (or JAX_NUM_PROCESSES)
       LLAMA4_JAX_PROCESS_ID      0 .. N-1                  (or JAX_PROCESS_ID)
  2. detected: a multi-host Cloud TPU slice, a SLURM job step or an Open MPI job with more than
     one process — then JAX's own cluster detection fills everything in.
  3. otherwise one process; nothing is initialised.
LLAMA4_JAX_DISTRIBUTED=off skips 1 and 2; =on forces 2 (jax detects, or fails saying why).

Failure handling (the JAX coordination service, no thread of ours):
  - LLAMA4_JAX_INIT_TIMEOUT (s, default 300): how long start-up waits for all processes;
  - LLAMA4_JAX_HEARTBEAT_TIMEOUT (s, default 60): a process that stops sending heartbeats for
    this long (killed, OOM, lost host) is declared dead and every other process aborts with
    "Terminating process because the JAX distributed service detected fatal errors ... another
    task died" (exit code 134). If process 0 (the coordinator) dies the others abort at once.
  - LLAMA4_JAX_SHUTDOWN_TIMEOUT (s, default 300): how long a finished process waits at exit for
    the others.
  - `fail_fast()` (around the training loop): a process whose Python code raises exits at once
    (os._exit) instead of waiting in the shutdown barrier for peers that are themselves blocked in
    a collective waiting for it; the others then stop as for a killed process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Mapping

import jax

from ..errors import DistributedError

_ALIASES = {"coordinator": ("LLAMA4_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
            "num_processes": ("LLAMA4_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
            "process_id": ("LLAMA4_JAX_PROCESS_ID", "JAX_PROCESS_ID")}
_TIMEOUTS = {"initialization_timeout": ("LLAMA4_JAX_INIT_TIMEOUT", 300),
             "heartbeat_timeout_seconds": ("LLAMA4_JAX_HEARTBEAT_TIMEOUT", 60),
             "shutdown_timeout_seconds": ("LLAMA4_JAX_SHUTDOWN_TIMEOUT", 300)}
_DETECTED = ("gcetpu", "gketpu", "slurm", "ompi")  # jax cluster types safe to probe unasked


def _lookup(env: Mapping, key: str) -> tuple[str, str] | None:
    for name in _ALIASES[key]:
        if env.get(name):
            return name, env[name]
    return None


def _int(env: Mapping, name: str, value: str, lo: int = 0) -> int:
    try:
        out = int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r}: expected an integer") from None
    if out < lo:
        raise DistributedError(f"{name}={value}: must be >= {lo}")
    return out


def settings(env: Mapping = os.environ) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None for a single process."""
    mode = env.get("LLAMA4_JAX_DISTRIBUTED", "auto").lower()
    if mode not in ("auto", "on", "off"):
        raise DistributedError(f"LLAMA4_JAX_DISTRIBUTED={mode!r}: expected auto, on or off")
    if mode == "off":
        return None
    kw = {key: _int(env, name, env.get(name, str(default)), lo=1) for key, (name, default) in _TIMEOUTS.items()}
    given = {key: _lookup(env, key) for key in _ALIASES}
    if any(given.values()):
        missing = [_ALIASES[k][0] for k, v in given.items() if v is None]
        if missing:
            raise DistributedError(f"multi-process settings incomplete: {', '.join(missing)} not set "
                                   f"({', '.join(f'{v[0]}={v[1]}' for v in given.values() if v)} are)")
        (_, addr), (n_name, n), (i_name, i) = given["coordinator"], given["num_processes"], given["process_id"]
        n, i = _int(env, n_name, n, lo=1), _int(env, i_name, i)
        if i >= n:
            raise DistributedError(f"{i_name}={i} is not below {n_name}={n}")
        if ":" not in addr:
            raise DistributedError(f"coordinator address {addr!r}: expected host:port")
        # Explicit settings win: without "deactivate", JAX would still consult SLURM/MPI variables and
        # (one process per node under SLURM) show each process only GPU number SLURM_LOCALID.
        return {"coordinator_address": addr, "num_processes": n, "process_id": i,
                "cluster_detection_method": "deactivate", **kw}
    if mode == "on" or _detected_cluster():
        return kw
    return None


def _detected_cluster() -> str | None:
    """Name of a multi-process cluster environment JAX knows how to read, if we are in one."""
    try:
        from jax._src import clusters
    except ImportError:  # private module: if it moves, only explicit settings work
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "name", "") not in _DETECTED:
            continue
        try:
            if env.is_env_present() and env.get_process_count() > 1:
                return env.name
        except Exception:  # a half-set environment (e.g. SLURM outside a job step): not a cluster
            continue
    return None


def initialize(env: Mapping = os.environ) -> str:
    """Start the distributed runtime if this is a multi-process run; describe what was done."""
    kw = settings(env)
    if kw is None or jax.distributed.is_initialized():
        return "single process"
    where = kw.get("coordinator_address", "auto-detected cluster")
    try:
        jax.distributed.initialize(**kw)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        if "must be called before" in msg:
            raise DistributedError(f"jax.distributed.initialize: {msg}") from None
        raise DistributedError(f"could not join the processes via {where} within "
                               f"{kw['initialization_timeout']}s: {msg[:300]}") from None
    except ValueError as e:
        raise DistributedError(f"jax.distributed.initialize ({where}): {' '.join(str(e).split())}") from None
    return (f"process {jax.process_index()} of {jax.process_count()} via {where}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices")


@contextlib.contextmanager
def fail_fast(passthrough: tuple[type[BaseException], ...] = ()):
    """In a multi-process run, turn an exception into an immediate exit of this process.

    A normal exit runs jax.distributed's shutdown barrier, which waits (up to the shutdown
    timeout) for peers that are blocked in the next collective, waiting for this process: both
    sides would sit there for minutes. Exiting without the barrier lets the coordination service
    see the process gone, and every other process aborts within the heartbeat timeout (at once
    when process 0 is the one that failed). `passthrough` exceptions (user errors every process
    meets at the same point) propagate normally. Single-process runs are not affected."""
    if jax.process_count() == 1:
        yield
        return
    try:
        yield
    except passthrough:
        raise
    except BaseException as e:
        code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        print(f"llama4-jax: process {jax.process_index()} of {jax.process_count()} failed "
              f"({type(e).__name__}); exiting now so that the other processes stop too",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)

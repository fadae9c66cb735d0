"""Out of device memory as a user error: what ran out, how much XLA asked for, what to change.

XLA reports OOM as a runtime error whose message holds RESOURCE_EXHAUSTED and, depending on the
backend, the request in bytes ("... trying to allocate 34359738368 bytes", "(34359738368B)") or
the use against the capacity ("Used 20.48G of 15.48G hbm"). The traceback says nothing a user can
act on; the shape of the stage and the knobs that shrink it do.
"""

from __future__ import annotations

import re

from ..errors import OutOfMemoryError
from ..parallel import format_bytes

_REQUEST = re.compile(r"(\d{4,})\s*(?:bytes\b|B\))")
_USED = re.compile(r"Used ([\d.]+)([KMGT])i?B? of ([\d.]+)([KMGT])i?B?")
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def is_oom(err: BaseException) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err)


def asked(message: str) -> str | None:
    """How much XLA asked for, as the message states it; None if it does not."""
    m = _REQUEST.search(message)
    if m:
        return f"{format_bytes(int(m.group(1)))} ({int(m.group(1)):,} bytes)"
    m = _USED.search(message)
    if m:
        used, cap = float(m.group(1)) * _UNIT[m.group(2)], float(m.group(3)) * _UNIT[m.group(4)]
        return f"{format_bytes(used)} of {format_bytes(cap)}"
    return None


def oom_error(err: BaseException, *, what: str, plan, remat: str, devices: str) -> OutOfMemoryError:
    """One line: `what` (e.g. "the train step") of stage `plan` ran out on `devices`; `remat` is
    the run's remat policy name (model/remat.py: `full` keeps the fewest activations)."""
    how_much = asked(str(err))
    need = f"; XLA asked for {how_much}" if how_much else ""
    stage = f"curriculum.stages[{plan.index}]"
    fixes = ([] if remat == "full" else ["model.runtime.remat=full"]) + [
        f"more {stage}.microbatches (now {plan.microbatches})",
        f"a smaller {stage}.batch_size or seq_len",
        "more devices (with mesh.fsdp / mesh.expert to shard the state)"]
    return OutOfMemoryError(
        f"out of device memory in {what} of stage {plan.name} (batch {plan.batch_size} × seq_len {plan.seq_len} "
        f"on {devices}){need}. Try {', '.join(fixes[:-1])} or {fixes[-1]}; the checkpoints are intact")

"""Where a compiled step spends its time: a jax.profiler trace joined with the step's HLO.

`llama4-jax bench --profile DIR` traces a few steps, saves the trace (open it in Perfetto or
TensorBoard's profiler) and the optimized HLO in DIR, and prints `report(...)`: wall time per
step attributed to the model source line each XLA op came from, split into matmuls and the rest.
Ops that run concurrently share the wall time they overlap, so the rows add up to the time the
device was busy. Written for XLA:CPU traces (one event per executed op, named like the HLO
instruction); on GPU the op names differ and the table may come out empty, but the trace is
still saved.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
from pathlib import Path

_DOT_KINDS = ("ynn_fusion", "dot", "dot_general", "custom-call", "cublas", "gemm")
_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def _stack_tables(lines: list[str]):
    """The HLO text's stack-frame tables → frame id → [(file, function, line), ...] innermost first."""
    files, funcs, locs, frames, section = {}, {}, {}, {}, None
    for line in lines:
        if line in _SECTIONS:
            section = line
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if not m:
            if line.strip() and not line.startswith(" "):  # the module text: tables are over
                section = None
            continue
        i, rest = int(m.group(1)), m.group(2)
        if section == "FileNames":
            files[i] = rest.strip('"')
        elif section == "FunctionNames":
            funcs[i] = rest.strip('"')
        elif section in ("FileLocations", "StackFrames"):
            d = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)}
            if section == "FileLocations":
                locs[i] = (Path(files.get(d.get("file_name_id"), "?")).name, funcs.get(d.get("function_name_id"), "?"),
                           d.get("line", 0))
            else:
                frames[i] = (d.get("file_location_id"), d.get("parent_frame_id", 0))

    def chain(fid: int) -> list:
        out, seen = [], set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            out.append(locs.get(loc, ("?", "?", 0)))
            fid = parent
        return out

    return chain


def _ops(hlo_text: str, project_files: tuple[str, ...]) -> dict:
    """HLO instruction name → (source 'file:function:line' of its innermost project frame, is matmul)."""
    lines = hlo_text.splitlines()
    chain = _stack_tables(lines)
    out = {}
    for line in lines:
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        sf = re.search(r"stack_frame_id=(\d+)", line)
        where = "(no source)"
        for file, func, lineno in (chain(int(sf.group(1))) if sf else []):
            if file in project_files:
                where = f"{file}:{func}:{lineno}"
                break
        kind = re.sub(r"[._]\d+$", "", m.group(1))
        out[m.group(1)] = (where, any(kind.startswith(k) for k in _DOT_KINDS))
    return out


def report(trace_dir: str | Path, hlo_text: str, steps: int, top: int = 25) -> str:
    """Table of wall ms per step by (source line, matmul or not), largest first."""
    project = tuple(Path(p).name for p in glob.glob(str(Path(__file__).resolve().parent.parent / "**" / "*.py"), recursive=True))
    ops = _ops(hlo_text, project)
    traces = sorted(glob.glob(str(Path(trace_dir) / "**" / "*.json.gz"), recursive=True))
    if not traces:
        return "no trace file found"
    events = json.load(gzip.open(traces[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    spans = [e for e in events if e.get("ph") == "X" and e.get("name") in ops and not e["name"].startswith("while")]
    # Sweep the timeline: concurrent ops split the time they overlap.
    points = sorted([(e["ts"], 1, i) for i, e in enumerate(spans)] + [(e["ts"] + e["dur"], -1, i)
                                                                     for i, e in enumerate(spans)])
    active, last, wall = set(), None, collections.Counter()
    for t, delta, i in points:
        if last is not None and active:
            for j in active:
                wall[j] += (t - last) / len(active)
        (active.add if delta == 1 else active.discard)(i)
        last = t
    by_src = collections.Counter()
    for i, us in wall.items():
        where, is_dot = ops[spans[i]["name"]]
        by_src[(where, "matmul" if is_dot else "other")] += us / 1e3 / steps
    total = sum(by_src.values())
    rows = [f"busy {total:.0f} ms per step; top {top} by source (ms per step, share):"]
    for (where, kind), ms in by_src.most_common(top):
        rows.append(f"{ms:8.1f} {ms / total:6.1%}  {kind:6s}  {where}")
    return "\n".join(rows)

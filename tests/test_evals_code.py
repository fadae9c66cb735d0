"""The code task end to end on a stub model, the pass@k estimator, and the sandbox: infinite
loops and fork bombs in a completion are stopped, counted as failures, and contained."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llama4_jax.evals import sandbox  # noqa: E402
from llama4_jax.evals.passk import pass_at_k  # noqa: E402
from llama4_jax.evals.tasks.hooks import read_jsonl  # noqa: E402

DOCS = {d["entry_point"]: d for d in read_jsonl("l4j_humaneval_mini.jsonl")}
WRONG = "    return None\n"
LOOP = "    while True:\n        pass\n"
FORK_BOMB = ("    import os\n    while True:\n        try:\n            os.fork()\n"
             "        except OSError:\n            pass\n")
FAST = sandbox.Limits(timeout_s=3.0, max_procs=8)


def test_pass_at_k_estimator_matches_the_combinatorial_formula():
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (5, 5, 5), (10, 3, 4), (200, 17, 10)]:
        want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_canonical_solutions_pass_and_wrong_ones_fail():
    for d in DOCS.values():
        assert sandbox.check_completion(d["prompt"], d["canonical_solution"], d["test"], d["entry_point"]).passed
        out = sandbox.check_completion(d["prompt"], WRONG, d["test"], d["entry_point"])
        assert out.status == "failed" and "AssertionError" in out.output


def test_infinite_loop_times_out():
    d = DOCS["add"]
    t0 = time.monotonic()
    out = sandbox.check_completion(d["prompt"], LOOP, d["test"], d["entry_point"], sandbox.Limits(timeout_s=1.0))
    assert out.status == "timeout" and not out.passed
    assert time.monotonic() - t0 < 10


def _plans():
    """Every containment that works on this machine: the default, and each path alone."""
    plan = sandbox.containment()
    plans = {"default": plan}
    if plan.cgroup_root is not None:
        plans["cgroup only"] = sandbox.Containment(plan.cgroup_root, None, None, sys.executable)
    if plan.uid is not None:
        plans["nobody only"] = sandbox.Containment(None, plan.uid, plan.gid, plan.python)
    return plans


@pytest.mark.parametrize("name", list(_plans()))
def test_fork_bomb_is_contained_and_killed(name):
    plan = _plans()[name]
    d = DOCS["is_even"]
    out = sandbox.check_completion(d["prompt"], FORK_BOMB, d["test"], d["entry_point"], FAST, plan)
    assert out.status == "timeout" and not out.passed
    # It tried to grow without end; the kernel held it at the limit (the count is the cgroup's,
    # or every process of the sandbox user).
    assert 2 <= out.peak_procs <= FAST.max_procs, out
    if plan.cgroup_root is not None:
        assert not list(plan.cgroup_root.glob("llama4_jax_sandbox_*")), "the run's cgroup was not removed"
    if plan.uid is not None:  # SIGKILL is delivered asynchronously: allow a moment to die
        deadline = time.monotonic() + 5
        while sandbox._uid_pids(plan.uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox._uid_pids(plan.uid) == [], "processes of the sandbox user survived"
    # The test process is unharmed: it can still start processes.
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"


def test_sandbox_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    out = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n")
    if sandbox.containment().uid is None:
        pytest.skip("no unprivileged user here: file access is not restricted")
    assert out.status == "failed" and not target.exists()


def test_refuses_without_containment(monkeypatch):
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox, "_pids_cgroup_root", lambda: None)
    monkeypatch.setattr(sandbox, "_unprivileged_python", lambda: None)
    with pytest.raises(sandbox.SandboxUnavailable, match="refusing"):
        sandbox.run_program("print(1)")


# --- the task through lm-eval, on a stub model -------------------------------------------------
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402

from llama4_jax.evals.tasks import task_manager  # noqa: E402

# For each problem, the 5 completions the stub gives in turn (c correct of n = 5).
PLAN = {
    "add": ["correct"] * 5,  # c = 5
    "is_even": ["correct", "wrong", "wrong", "correct", "wrong"],  # c = 2
    "reverse_words": ["wrong"] * 4 + ["correct"],  # c = 1
    "count_vowels": ["loop", "wrong", "wrong", "wrong", "wrong"],  # c = 0
    "running_max": ["fork", "correct", "correct", "correct", "wrong"],  # c = 3
}


class StubLM(LM):
    """Answers each code prompt with the PLAN's completions, in order; stop strings cut them as
    a real model's would be cut."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def _completion(self, prompt: str) -> str:
        name = next(n for n, d in DOCS.items() if d["prompt"] == prompt)
        i = self.calls.get(name, 0)
        self.calls[name] = i + 1
        kind = PLAN[name][i % len(PLAN[name])]
        body = {"correct": DOCS[name]["canonical_solution"], "wrong": WRONG, "loop": LOOP, "fork": FORK_BOMB}[kind]
        return body + "\ndef unrelated():\n    pass\n"  # after the stop string "\ndef": cut

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for req in requests:
            text = self._completion(req.args[0])
            for stop in req.args[1]["until"]:
                text = text.split(stop)[0]
            out.append(text)
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_pass_at_k_task_on_a_stub_model():
    res = lm_eval.simple_evaluate(model=StubLM(), tasks=["l4j_humaneval_mini_pass5"], task_manager=task_manager(),
                                  confirm_run_unsafe_code=True, bootstrap_iters=0)
    got = res["results"]["l4j_humaneval_mini_pass5"]
    counts = [5, 2, 1, 0, 3]
    want1 = sum(c / 5 for c in counts) / 5
    want5 = sum(pass_at_k(5, c, 5) for c in counts) / 5  # 1 for every problem with c > 0
    assert got["pass@1,all"] == pytest.approx(want1, abs=1e-12) and want1 == pytest.approx(0.44)
    assert got["pass@5,all"] == pytest.approx(want5, abs=1e-12) and want5 == pytest.approx(0.8)


def test_greedy_pass_at_1_on_a_stub_model():
    res = lm_eval.simple_evaluate(model=StubLM(), tasks=["l4j_humaneval_mini"], task_manager=task_manager(),
                                  confirm_run_unsafe_code=True, bootstrap_iters=0)
    # First completion of each: correct, correct, wrong, loop, fork → 2 of 5.
    assert res["results"]["l4j_humaneval_mini"]["pass@1,all"] == pytest.approx(0.4, abs=1e-12)

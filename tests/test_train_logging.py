"""What a run leaves to look at: TensorBoard events (read back with TensorBoard's own reader),
metrics.jsonl (the contract: step, stage, loss, lr; floats exact), and a loss that falls."""

import json
import math
from io import BytesIO

import numpy as np
import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llama4_jax.config import load_experiment
from train_fixtures import EVAL_EVERY, TINY, tiny_run, xla_cache  # noqa: F401  (autouse fixture)

SOURCES = ("prose", "code", "rare")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir, _ = tiny_run(tmp_path_factory)
    return workdir, (workdir / "metrics.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def events(run):
    workdir, _ = run
    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def _moe_layers() -> tuple[int, ...]:
    """The model's indices of its MoE layers: the names the MoE metrics carry."""
    return load_experiment(TINY).to_model_config().moe_layers


def _stage_ends() -> dict[str, int]:
    ends, at = {}, 0
    for st in load_experiment(TINY).curriculum.resolved_stages():
        at += st.steps
        ends[st.name] = at
    return ends


def _rows(lines):
    return [json.loads(line) for line in lines]


# --- TensorBoard ----------------------------------------------------------------------------------

def test_tensorboard_holds_every_documented_series(events):
    scalars, hists = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    images = set(events.Tags()["images"])
    want = {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "stage_index", "time/eval_s", "time/checkpoint_s"}
    want |= {f"loss/{s}" for s in SOURCES} | {f"eval/loss/{s}" for s in SOURCES}
    layers = _moe_layers()
    assert len(layers) >= 2 and layers != tuple(range(len(layers)))  # model indices differ from ranks
    E = load_experiment(TINY).to_model_config().moe.num_experts
    for i in layers:
        want |= {f"moe/layer{i}/{k}" for k in ("max_violation", "entropy", "aux_loss", "z_loss", "dropped_frac")}
        want |= {f"moe/layer{i}/load/expert{e}" for e in range(E)}
    assert want <= scalars, sorted(want - scalars)
    assert not [t for t in scalars | hists if t.startswith("moe/layer") and int(t.split("/")[1][5:]) not in layers]
    assert {f"moe/layer{i}/load" for i in layers} <= hists, sorted(hists)
    assert {f"moe/layer{i}/load_by_source" for i in layers} <= images, sorted(images)


def test_tensorboard_values_match_metrics_jsonl(run, events):
    _, lines = run
    rows = [r for r in _rows(lines) if "loss" in r]
    for tag in ("loss", "lr", "grad_norm", "stage_index", "loss/code"):
        tb = {e.step: e.value for e in events.Scalars(tag)}
        js = {r["step"]: r[tag] for r in rows if tag in r}
        assert set(tb) == set(js), tag
        for step, v in js.items():
            assert tb[step] == pytest.approx(v, rel=1e-6, abs=1e-30), (tag, step)  # TB stores float32
    # Stage index steps exactly where metrics.jsonl's stage names change.
    names = list(_stage_ends())
    assert all(names[int(e.value)] == next(r["stage"] for r in rows if r["step"] == e.step)
               for e in events.Scalars("stage_index"))


def test_expert_load_histogram_is_a_distribution_over_experts(events):
    E = load_experiment(TINY).to_model_config().moe.num_experts
    h = events.Histograms(f"moe/layer{_moe_layers()[0]}/load")
    assert h
    for ev in h:
        v = ev.histogram_value
        assert v.num == E and v.sum == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= v.min <= v.max <= 1.0


def test_expert_load_by_source_rows_and_heatmaps(run, events):
    """Per MoE layer, each source present in the logged batch has a load over experts that sums
    to 1, in metrics.jsonl; TensorBoard holds the source × expert heatmap as a PNG."""
    _, lines = run
    E = load_experiment(TINY).to_model_config().moe.num_experts
    for r in (r for r in _rows(lines) if "loss" in r):
        present = {k.split("/", 1)[1] for k in r if k.startswith("loss/")}
        for layer in _moe_layers():
            got = {k.rsplit("/", 1)[1]: v for k, v in r.items() if k.startswith(f"moe/layer{layer}/load_by_source/")}
            assert set(got) == present, (r["step"], layer, sorted(got))
            for v in got.values():
                assert len(v) == E and sum(v) == pytest.approx(1.0, abs=1e-5) and min(v) >= 0.0
            total = [r[f"moe/layer{layer}/load/expert{e}"] for e in range(E)]
            assert sum(total) == pytest.approx(1.0, abs=1e-5)
    ims = events.Images(f"moe/layer{_moe_layers()[0]}/load_by_source")
    assert ims
    img = Image.open(BytesIO(ims[-1].encoded_image_string))
    assert img.width > 4 * E and img.height > 18 * 2, img.size


def test_throughput_and_mfu_are_positive_and_consistent(run):
    _, lines = run
    rows = [r for r in _rows(lines) if "tokens_per_s" in r]
    assert rows
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    # mfu / tokens_per_s = FLOPs per token / peak: the same within a stage (one seq_len).
    by_stage = {}
    for r in rows:
        by_stage.setdefault(r["stage"], []).append(r["mfu"] / r["tokens_per_s"])
    for ratios in by_stage.values():
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)


# --- metrics.jsonl --------------------------------------------------------------------------------

def _no_constants(name):
    raise AssertionError(f"non-standard JSON constant {name} in metrics.jsonl")


def test_jsonl_rows_are_exact_json(run):
    _, lines = run
    assert lines
    for line in lines:
        row = json.loads(line, parse_constant=_no_constants)
        # Written with json.dumps: re-encoding reproduces the line, i.e. every float is the
        # shortest repr that reads back to the same double.
        assert json.dumps(row) == line
        for k, v in row.items():
            for x in (v if isinstance(v, list) else [v]):  # vectors: a source's load over experts
                assert isinstance(x, (int, float, str)) and not isinstance(x, bool), (k, v)
                if isinstance(x, float):
                    assert math.isfinite(x) and float(repr(x)) == x


def test_every_train_step_row_has_the_contract_fields(run):
    _, lines = run
    rows = [r for r in _rows(lines) if "loss" in r]
    total = max(_stage_ends().values())
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    for r in rows:
        assert isinstance(r["step"], int) and isinstance(r["stage"], str)
        assert isinstance(r["loss"], float) and isinstance(r["lr"], float)
        assert isinstance(r["stage_index"], int) and isinstance(r["skipped_steps"], int)  # counts stay ints


def test_every_jsonl_row_has_step_stage_loss_lr(run):
    _, lines = run
    for r in _rows(lines):
        assert {"step", "stage", "loss", "lr"} <= set(r), r


def test_eval_loss_per_source_at_eval_steps_and_stage_ends(run):
    _, lines = run
    rows = [r for r in _rows(lines) if any(k.startswith("eval/") for k in r)]
    ends = _stage_ends()
    want_steps = sorted(set(range(EVAL_EVERY, max(ends.values()) + 1, EVAL_EVERY)) | set(ends.values()))
    got = {}
    for r in rows:
        got.setdefault(r["step"], {}).update(r)
    assert sorted(got) == want_steps
    for step, r in got.items():
        per_src = [r[f"eval/loss/{s}"] for s in SOURCES]
        assert all(0 < v < math.log(264) + 1 for v in per_src), r
        assert r["eval/loss"] == pytest.approx(np.mean(per_src), rel=1e-12)
    # Held-out loss improves from the first evaluation to the last.
    first, last = got[want_steps[0]], got[want_steps[-1]]
    assert last["eval/loss"] < first["eval/loss"]


def test_loss_falls_in_every_stage(run):
    """First few vs last few logged losses of each stage. The batch loss mixes sources, and the
    long-tail sampler deliberately shifts the mix toward the sources with high loss, so the
    comparison is made per source (every stage) and on the batch loss (static stages only)."""
    _, lines = run
    rows = [r for r in _rows(lines) if "loss" in r]
    raw = {s["name"]: s for s in yaml.safe_load(TINY.read_text())["curriculum"]["stages"]}
    for name, st in raw.items():
        in_stage = [r for r in rows if r["stage"] == name]
        if st.get("sampler", {}).get("type", "static") == "static":
            losses = [r["loss"] for r in in_stage]
            assert np.mean(losses[-3:]) < np.mean(losses[:3]), (name, losses)
        checked = 0
        for src in SOURCES:
            seq = [r[f"loss/{src}"] for r in in_stage if f"loss/{src}" in r]
            if len(seq) >= 4:
                k = min(3, len(seq) // 2)
                assert np.mean(seq[-k:]) < np.mean(seq[:k]), (name, src, seq)
                checked += 1
        assert checked >= 1, name
    # Per-source losses are logged for exactly the sources each stage draws from.
    for r in rows:
        logged = {k.split("/", 1)[1] for k in r if k.startswith("loss/")}
        assert logged <= {s for s, w in raw[r["stage"]]["mixture"].items() if w > 0}, r


def test_resume_after_a_lost_tail_purges_the_orphaned_tensorboard_events(tmp_path, monkeypatch):
    """A run dies after its step-5 checkpoint having logged steps 6-7; the resumed run logs them
    again. TensorBoard must show each step once, with the resumed run's values (as metrics.jsonl)."""
    import shutil

    from train_fixtures import train, train_rows

    workdir = tmp_path / "run"
    sets = ("checkpoint.every_steps=5", "checkpoint.keep_last=2", "eval.every_steps=0")
    monkeypatch.setenv("LLAMA4_JAX_STOP_AT_STEP", "7")
    train(TINY, workdir, *sets)
    shutil.rmtree(workdir / "checkpoints" / "7")  # as if killed after logging 6-7 but before saving 7
    monkeypatch.delenv("LLAMA4_JAX_STOP_AT_STEP")
    train(TINY, workdir, *sets)
    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss")]
    assert steps == sorted(set(steps)), f"duplicated or out-of-order steps: {steps}"
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == steps
    for e, r in zip(acc.Scalars("loss"), rows):
        assert np.isclose(e.value, r["loss"], rtol=1e-6), (e.step, e.value, r["loss"])

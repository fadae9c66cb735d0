"""`llama4-jax eval`: lm-eval tasks on a converted fixture (exit 0, JSON written), per-source
perplexity of a training run that reproduces the run's own logged eval losses, and user
mistakes (missing source, unknown task) as one line on stderr with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evals_fixtures import HF_CONFIG, build_tokenizer, converted_with_tokenizer  # noqa: E402
from train_fixtures import read_rows, train  # noqa: E402

from llama4_jax.cli import main  # noqa: E402

pytest.importorskip("lm_eval")
CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus"
RUN_YAML = f"""\
seed: 0
model: {{preset: tiny, overrides: {{vocab_size: 264, num_layers: 2}}}}
precision: {{param_dtype: float32, compute_dtype: float32}}
optimizer: {{lr: 3.0e-3, schedule: {{type: stages}}}}
data:
  tokenizer: {{type: byte}}
  sources:
    prose: {{kind: text, path: {CORPUS / 'prose.txt'}, split: line, eval_fraction: 0.2}}
    code: {{kind: jsonl, path: {CORPUS / 'code.jsonl'}, eval_fraction: 0.2}}
curriculum:
  stages:
    - {{name: base, steps: 3, seq_len: 32, batch_size: 4, mixture: {{prose: 0.5, code: 0.5}}}}
checkpoint: {{every_steps: 1000, keep_last: 1, async_save: false}}
logging: {{every_steps: 1, tensorboard: false, progress: false}}
eval: {{every_steps: 3, batches: 2}}
"""


@pytest.fixture(scope="module")
def converted(make_hf, tmp_path_factory):
    _, hf_dir = make_hf("evals_cli", seed=5, **HF_CONFIG)
    tok = build_tokenizer(tmp_path_factory.mktemp("evals_cli_tok"))
    return converted_with_tokenizer(hf_dir, tmp_path_factory.mktemp("evals_cli_conv") / "c", tok)


def test_eval_tasks_on_a_converted_checkpoint_writes_json(converted, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", str(converted), "--tasks", "l4j_mmlu_mini", "--limit", "6", "--batch-size", "4",
               "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    acc = res["results"]["l4j_mmlu_mini"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"]["l4j_mmlu_mini"]["effective"] == 6
    assert "l4j_mmlu_mini" in capsys.readouterr().out  # the table


def test_eval_code_task_runs_generations_in_the_sandbox(converted, tmp_path):
    """Our adapter's sampled generations through the pass@k task (random weights: nothing passes)."""
    out = tmp_path / "code.json"
    rc = main(["eval", str(converted), "--tasks", "l4j_humaneval_mini_pass5", "--limit", "1", "--max-length", "192",
               "--output", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())["results"]["l4j_humaneval_mini_pass5"]
    assert got["pass@1,all"] == 0.0 and got["pass@5,all"] == 0.0


def test_perplexity_of_a_run_matches_its_logged_eval_losses(tmp_path, capsys):
    exp = tmp_path / "run.yaml"
    exp.write_text(RUN_YAML)
    workdir = tmp_path / "run"
    train(exp, workdir)
    logged = [r for r in read_rows(workdir) if "eval/loss/prose" in r][-1]
    out = tmp_path / "ppl.json"
    assert main(["eval", str(workdir), "--perplexity", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shape"] == {"seq_len": 32, "batch_size": 4, "max_batches": 2}
    for src in ("prose", "code"):
        got = res["perplexity"][src]
        assert got["loss"] == pytest.approx(logged[f"eval/loss/{src}"], rel=1e-5), src
        assert got["perplexity"] == pytest.approx(2.718281828459045 ** got["loss"], rel=1e-9)
        assert got["tokens"] > 0
    assert "prose" in capsys.readouterr().out


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "llama4_jax", "eval", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.parametrize("case", ["missing source", "unknown task"])
def test_user_mistakes_exit_2_with_one_line(case, converted, tmp_path):
    if case == "missing source":
        p = _cli(str(tmp_path / "nope"), "--tasks", "l4j_mmlu_mini")
        want = "no such model source"
    else:
        p = _cli(str(converted), "--tasks", "l4j_mmlu_minii")
        want = "unknown task 'l4j_mmlu_minii' (did you mean 'l4j_mmlu_mini'?)"
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama4-jax: error:") and want in lines[0], p.stderr

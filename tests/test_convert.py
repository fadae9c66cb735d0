"""`llama4-jax convert`: user mistakes exit 2 with one line naming the file or tensor and write
nothing; the success path works as a subprocess (`python -m llama4_jax`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama4_jax import cli
from llama4_jax.convert.hf import read_hf_params, to_hf
from llama4_jax.model import store
from llama4_jax.model.config import ModelConfig, MoEConfig

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, dense_ff=24,
                  moe=MoEConfig(num_experts=2, top_k=1, expert_ff=12), interleave_moe_layer_step=2,
                  attention_chunk_size=8)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, random_flat):
    """A valid HF Llama4ForCausalLM directory (written by our exporter, checked in test_hf_parity)."""
    root = tmp_path_factory.mktemp("convert")
    store.save_params(root / "ckpt", CFG, random_flat(CFG))
    to_hf(root / "ckpt", root / "hf")
    return root / "hf"


@pytest.fixture
def src(hf_dir, tmp_path):
    """A private copy of the valid directory, for a test to break."""
    return Path(shutil.copytree(hf_dir, tmp_path / "src"))


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    print(err, end="")  # visible with -s
    return rc, err


def assert_user_error(rc, err, *must_name, out: Path):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("llama4-jax: error: "), err
    for s in must_name:
        assert s in lines[0], (s, lines[0])
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.partial*")), "a partial output was left behind"


def rewrite_tensors(src: Path, edit) -> None:
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors")


def test_missing_config_json(src, tmp_path, capsys):
    (src / "config.json").unlink()
    rc, err = run_cli(capsys, "convert", "from-hf", src, tmp_path / "out")
    assert_user_error(rc, err, str(src / "config.json"), out=tmp_path / "out")


def test_invalid_config_json(src, tmp_path, capsys):
    (src / "config.json").write_text('{"architectures": [')
    rc, err = run_cli(capsys, "convert", "from-hf", src, tmp_path / "out")
    assert_user_error(rc, err, str(src / "config.json"), "invalid JSON", out=tmp_path / "out")


def test_missing_safetensors(src, tmp_path, capsys):
    (src / "model.safetensors").unlink()
    rc, err = run_cli(capsys, "convert", "from-hf", src, tmp_path / "out")
    assert_user_error(rc, err, str(src), "model.safetensors", out=tmp_path / "out")


def test_missing_shard(src, tmp_path, capsys):
    names = list(load_file(src / "model.safetensors"))
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    wm = {n: "model-00001-of-00002.safetensors" for n in names}
    wm["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    rc, err = run_cli(capsys, "convert", "from-hf", src, tmp_path / "out")
    assert_user_error(rc, err, "model-00002-of-00002.safetensors", "model.norm.weight", out=tmp_path / "out")


def test_wrong_tensor_shape_names_the_tensor(src, tmp_path, capsys):
    name = "model.layers.1.feed_forward.experts.down_proj"
    rewrite_tensors(src, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name][:, :-1])))
    rc, err = run_cli(capsys, "convert", "from-hf", src, tmp_path / "out")
    assert_user_error(rc, err, name, "(2, 11, 16)", "(2, 12, 16)", out=tmp_path / "out")


def test_missing_tensor_names_the_tensor(src, tmp_path, capsys):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_tensors(src, lambda t: t.pop(name))
    rc, err = run_cli(capsys, "convert", "from-hf", src, tmp_path / "out")
    assert_user_error(rc, err, name, out=tmp_path / "out")


def test_unknown_architecture(src, tmp_path, capsys):
    raw = json.loads((src / "config.json").read_text())
    raw.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (src / "config.json").write_text(json.dumps(raw))
    rc, err = run_cli(capsys, "convert", "from-hf", src, tmp_path / "out")
    assert_user_error(rc, err, str(src / "config.json"), "LlamaForCausalLM", out=tmp_path / "out")


@pytest.mark.parametrize("direction", ["from-hf", "to-hf"])
def test_non_empty_out_dir_is_refused_and_left_alone(hf_dir, tmp_path, capsys, direction):
    source = hf_dir if direction == "from-hf" else hf_dir.parent / "ckpt"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_cli(capsys, "convert", direction, source, out)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(out) in err and "not empty" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".out.partial*"))


def test_to_hf_from_a_non_checkpoint(hf_dir, tmp_path, capsys):
    rc, err = run_cli(capsys, "convert", "to-hf", hf_dir, tmp_path / "out")  # an HF dir, not ours
    assert_user_error(rc, err, "model_config.json", out=tmp_path / "out")


def test_from_hf_subprocess_success(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-m", "llama4_jax", "convert", "from-hf", str(hf_dir), str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [store.CONFIG_FILE, store.PARAMS_DIR, store.RUNTIME_FILE, store.TOKENS_FILE, store.GENERATION_FILE])
    cfg, flat, _ = store.load_params(out)
    _, want = read_hf_params(hf_dir)
    assert cfg.moe_layers == CFG.moe_layers and cfg.no_rope_layers == CFG.no_rope_layers
    assert sorted(flat) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(flat[k]), want[k], err_msg=k)

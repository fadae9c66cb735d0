"""`llama4-jax generate`: streams the same text the Python API returns, from a params checkpoint
and from a Hugging Face directory; user mistakes exit 2 with one stderr line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama4_jax
from llama4_jax import cli
from llama4_jax.convert.hf import to_hf
from llama4_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from llama4_jax.infer.cli import Streamer, hf_eos_ids
from llama4_jax.model import store
from llama4_jax.model.config import ModelConfig, MoEConfig

REPO = Path(__file__).resolve().parent.parent
CFG = ModelConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dense_ff=48,
                  moe=MoEConfig(num_experts=4, top_k=1, expert_ff=24), interleave_moe_layer_step=2,
                  attention_chunk_size=8, max_position_embeddings=64)
PROMPTS = ["the cat", "a longer prompt"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, random_flat):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("gen")
    store.save_params(root / "ckpt", CFG, random_flat(CFG, std=0.5))
    to_hf(root / "ckpt", root / "hf")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "a longer prompt about cats"] * 20, trainer)
    tok.save(str(root / "hf" / "tokenizer.json"))
    return root


def run(capsys, *argv):
    capsys.readouterr()
    rc = cli.main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def expected(model, tok, eos_ids, n=12):
    texts = llama4_jax.generate(model, tok, PROMPTS, max_new_tokens=n, eos_ids=eos_ids).texts
    return "\n\n".join(texts) + "\n"


def test_from_params_checkpoint_with_byte_tokenizer(dirs, capsys):
    rc, out, err = run(capsys, dirs / "ckpt", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--tokenizer", "byte",
                       "--max-new-tokens", 12)
    assert rc == 0, err
    assert out == expected(llama4_jax.load_checkpoint(dirs / "ckpt"), ByteTokenizer(), [258])
    assert len(out.strip()) > 0


def test_from_hf_dir_uses_its_tokenizer_and_eos(dirs, capsys, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text(PROMPTS[1])
    rc, out, err = run(capsys, dirs / "hf", "--prompt", PROMPTS[0], "--prompt-file", prompt_file, "--max-new-tokens", 12)
    assert rc == 0, err
    tok = HFTokenizer(str(dirs / "hf" / "tokenizer.json"))
    assert out == expected(llama4_jax.load_hf(dirs / "hf"), tok, [2])  # config.json's eos_token_id


def test_hf_eos_ids_prefer_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 9}}))
    assert hf_eos_ids(tmp_path) == [9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 4]}))
    assert hf_eos_ids(tmp_path) == [3, 4]


def test_streamer_writes_row_zero_at_once_and_later_rows_in_order():
    out = io.StringIO()
    s = Streamer(ByteTokenizer(), 2, eos_ids=[258], out=out)
    s(np.array([ord("a"), ord("x")]), np.array([False, False]))
    assert out.getvalue() == "a"
    s(np.array([258, ord("y")]), np.array([True, False]))  # row 0 ends: row 1's text so far follows
    assert out.getvalue() == "a\n\nxy"
    s(np.array([256, ord("z")]), np.array([True, False]))
    s.flush(final=True)
    assert out.getvalue() == "a\n\nxyz\n"


@pytest.mark.parametrize("args, message", [
    (["/no/such/dir", "--prompt", "x"], "not found"),
    (["{ckpt}", "--prompt", "x" * 100, "--tokenizer", "byte"], "max_position_embeddings=64"),
    (["{ckpt}", "--prompt", "x", "--tokenizer", "nope.bin"], "unknown tokenizer"),
    (["{ckpt}", "--prompt", "x"], "no tokenizer"),
    (["{ckpt}", "--prompt", "x", "--tokenizer", "byte", "--top-p", "0"], "top_p"),
], ids=["missing-source", "prompt-too-long", "unknown-tokenizer", "no-tokenizer", "bad-top-p"])
def test_user_errors_exit_2_with_one_line(dirs, capsys, args, message):
    rc, out, err = run(capsys, *[a.format(ckpt=dirs / "ckpt") for a in args])
    assert rc == 2
    assert err.count("\n") == 1 and message in err, err


def test_subprocess_streams_and_exits_0(dirs):
    r = subprocess.run([sys.executable, "-m", "llama4_jax", "generate", str(dirs / "ckpt"), "--prompt", "hi",
                        "--tokenizer", "byte", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and "tokens in" in r.stderr

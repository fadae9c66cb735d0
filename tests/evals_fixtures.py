"""Shared by tests/test_evals_*.py: a small HF tokenizer trained here on the local tasks' text
(no hub), and a tiny random-weight Llama 4 whose vocabulary holds it."""

from __future__ import annotations

import shutil
from pathlib import Path

from llama4_jax.evals.tasks.hooks import read_jsonl

VOCAB = 384
BOS, EOS, PAD = "<|begin_of_text|>", "<|endoftext|>", "<pad>"
# Small, but with every feature the parity must hold for: NoPE and chunked RoPE layers (chunk 16
# < the longest requests), MoE and dense layers, GQA, top-1 routing, a 96-token max length (the
# rolling windows and the left truncation both happen).
HF_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, head_dim=16,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1,
                 num_hidden_layers=2, interleave_moe_layer_step=2, attention_chunk_size=16, no_rope_layers=[1, 0],
                 floor_scale=4, attn_scale=0.5, max_position_embeddings=96,
                 eos_token_id=0, bos_token_id=1, pad_token_id=2,  # the tokenizer's specials: HF generate stops at eos
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def task_texts() -> list[str]:
    texts = []
    for d in read_jsonl("l4j_mmlu_mini.jsonl"):
        texts.append(d["question"] + "\n" + "\n".join(f"{l}. {c}" for l, c in zip("ABCD", d["choices"])) + "\nAnswer: A B C D")
    for d in read_jsonl("l4j_humaneval_mini.jsonl"):
        texts.append(d["prompt"] + d["canonical_solution"])
    return texts


def build_tokenizer(out_dir: Path) -> Path:
    """Byte-level BPE over the tasks' text → out_dir/tokenizer.json (+ tokenizer_config.json for
    transformers). Returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, BOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(task_texts(), trainer)
    assert tok.get_vocab_size() <= VOCAB
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


def hf_tokenizer(tokenizer_json: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), bos_token=BOS, eos_token=EOS, pad_token=PAD)


def converted_with_tokenizer(hf_dir: Path, out_dir: Path, tokenizer_json: Path) -> Path:
    from llama4_jax.convert.hf import from_hf

    from_hf(hf_dir, out_dir)
    shutil.copy(tokenizer_json, out_dir / "tokenizer.json")
    return out_dir

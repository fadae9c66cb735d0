"""lm-eval over our adapter and over lm-eval's own `hf` backend (HFLM) on the same random-weight
Llama 4 and the same local tokenizer: identical accuracies, per-request log-likelihoods within
1e-4 (loglikelihood and loglikelihood_rolling), identical greedy flags."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evals_fixtures import HF_CONFIG, build_tokenizer, converted_with_tokenizer, hf_tokenizer  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
from lm_eval.api.instance import Instance  # noqa: E402

from llama4_jax.evals.lm_adapter import Llama4LM  # noqa: E402
from llama4_jax.evals.tasks import task_manager  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(make_hf, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    hf_model, hf_dir = make_hf("evals_parity", seed=3, **HF_CONFIG)
    tok_json = build_tokenizer(tmp_path_factory.mktemp("evals_tok"))
    ours = Llama4LM(source=str(converted_with_tokenizer(hf_dir, tmp_path_factory.mktemp("evals_conv") / "c", tok_json)),
                    batch_size=4)
    theirs = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer(tok_json), batch_size=4, device="cpu", dtype="float32")
    return ours, theirs


def _run(lm, tasks, **kw):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager(), log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, **kw)


def test_multiple_choice_task_matches_hf_backend(pair):
    ours, theirs = pair
    a, b = _run(ours, ["l4j_mmlu_mini"]), _run(theirs, ["l4j_mmlu_mini"])
    assert a["results"]["l4j_mmlu_mini"]["acc,none"] == b["results"]["l4j_mmlu_mini"]["acc,none"]
    sa, sb = a["samples"]["l4j_mmlu_mini"], b["samples"]["l4j_mmlu_mini"]
    assert len(sa) == len(sb) == 20
    for x, y in zip(sa, sb):
        assert x["arguments"] == y["arguments"]
        assert len(x["filtered_resps"]) == len(y["filtered_resps"]) == 4  # one (logp, is_greedy) per choice
        for (lx, gx), (ly, gy) in zip(x["filtered_resps"], y["filtered_resps"]):
            assert abs(float(lx) - float(ly)) <= TOL and bool(gx) == bool(gy), (x["doc_id"], lx, ly, gx, gy)


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_edge_cases_match_hf_backend(pair):
    """Empty context (prefix token), trailing spaces moved to the continuation, a pair longer
    than max_length (left truncation), multi-token continuations."""
    ours, theirs = pair
    long_ctx = "What is 7 + 5? " * 40
    args = [("", "What is the capital of France?"), ("Answer: ", "Paris"), ("What is 9 times 6?\nAnswer:", " 54"),
            (long_ctx, " twelve and more"), ("def add(a, b):\n", "    return a + b\n")]
    a, b = ours.loglikelihood(_requests("loglikelihood", args)), theirs.loglikelihood(_requests("loglikelihood", args))
    for (la, ga), (lb, gb), arg in zip(a, b, args):
        assert abs(la - lb) <= TOL and ga == gb, (arg, la, lb)


def test_loglikelihood_rolling_matches_hf_backend(pair):
    """One window, and texts of several max_length windows."""
    ours, theirs = pair
    texts = [("Which planet is closest to the Sun?",),
             ("def running_max(xs):\n    out = []\n    for x in xs:\n        out.append(x)\n" * 6,),
             ("How many sides does a hexagon have? six. " * 12,)]
    assert len(ours.tok_encode(texts[1][0])) > 2 * ours.max_length
    a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    b = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    for la, lb in zip(a, b):
        assert abs(la - lb) <= TOL, (la, lb)


def test_greedy_generate_until_matches_hf_backend(pair):
    """Greedy generation with stop strings. HFLM runs one request per batch: it left-pads a
    batch, which shifts Llama 4's absolute positions (chunk boundaries, NoPE temperature) for
    the shorter prompts; our batches pad on the right, where nothing moves."""
    from lm_eval.models.huggingface import HFLM

    ours, theirs = pair
    one = HFLM(pretrained=theirs.model, tokenizer=theirs.tokenizer, batch_size=1, device="cpu", dtype="float32")
    gen = {"until": ["\ndef", "\n#"], "max_gen_toks": 12, "do_sample": False}
    args = [("def add(a, b):\n", gen), ("What is 7 + 5?\nAnswer:", gen),
            ("def running_max(xs):\n    out = []\n", {**gen, "until": ["\n"], "max_gen_toks": 9})]
    a = ours.generate_until(_requests("generate_until", args))
    b = one.generate_until(_requests("generate_until", args))
    assert a == b and any(a), (a, b)


def test_fallback_decoder_matches_kv_cache_generation(pair):
    """The full-forward loop (used for scanned layouts and raised max lengths) and infer/'s KV
    cache give the same greedy tokens."""
    ours, _ = pair
    prompts = [ours.tok_encode(t) for t in ["def add(a, b):\n", "What is 7 + 5?\nAnswer:", "def is_even(n):"]]
    eos = [ours.eot_token_id]
    a = ours.runner.generate_ids(prompts, 10, eos_ids=eos)
    b = ours._generate(prompts, 10, eos_ids=eos, temperature=0.0, seed=0)
    assert a == b and all(a), (a, b)

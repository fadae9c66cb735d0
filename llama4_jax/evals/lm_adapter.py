"""lm-evaluation-harness over our model: `Llama4LM`, an `lm_eval.api.model.LM`.

    lm = Llama4LM(source="runs/quickstart")             # or Llama4LM(model, tokenizer)
    lm_eval.simple_evaluate(model=lm, tasks=["l4j_mmlu_mini"], task_manager=task_manager())

Requests are tokenized and split exactly as lm-eval's `hf` backend does (HFLM), so the two give
the same per-request log-likelihoods on the same weights and tokenizer:
  - (context, continuation): trailing spaces of the context move to the continuation, the pair
    is encoded whole and the continuation is what follows the context's own encoding
    (TemplateLM._encode_pair); an empty context becomes the prefix token (BOS, else EOS).
  - The scored sequence is (context + continuation) cut to its last max_length + 1 tokens.
  - Rolling log-likelihood: disjoint windows of max_length tokens from get_rolling_token_windows
    (context_len 1, the first window after the prefix token), summed.
  - Generation: contexts left-truncated to max_length − max_gen_toks; the text is cut at the
    first stop string; generation also ends at the tokenizer's EOS. It runs on infer/'s KV
    cache, or on a full-forward loop where that cannot run (see `_generate`).
Texts are encoded without special tokens (our tokenizers add none), as HFLM does with a
tokenizer.json that has no post-processor.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs

from ..data.tokenizer import Tokenizer
from ..infer.generate import generate_ids as kv_generate_ids
from ..infer.sampling import Sampling
from .loading import load_model, load_tokenizer
from .scoring import Runner

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


class Llama4LM(TemplateLM):
    """Our Llama4 behind lm-eval's LM interface; batched, jitted, length-bucketed."""

    def __init__(self, model=None, tokenizer: Tokenizer | None = None, *, source: str | None = None,
                 tokenizer_path: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0,
                 generate_fn: Callable | None = None, **unused):
        super().__init__()
        if unused:
            log.warning("Llama4LM: ignoring arguments %s", sorted(unused))
        if model is None:
            if source is None:
                raise ValueError("Llama4LM needs a model or a source path")
            model = load_model(source)
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source or "", tokenizer_path)
        self._max_length = int(max_length or model.cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size)  # lm-eval passes strings from --model_args
        self.seed = seed
        self.runner = Runner(model, self.batch_size, self._max_length, pad_id=self.tokenizer.pad_id)
        # Where generation happens: (prompts, max_new, eos_ids=, temperature=, seed=, stop=) → new
        # ids of each, up to and including EOS. Tests swap in stubs.
        self.generate_fn = generate_fn or self._generate

    # --- what TemplateLM needs ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # our tokenizers fall back to EOS when there is no BOS, as HFLM does

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "fingerprint", type(self.tokenizer).__name__)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # --- scoring -------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) → (log p(continuation), is_greedy)."""
        rows = []
        for _, ctx, cont in requests:
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError(f"bad request: {len(ctx)} context and {len(cont)} continuation tokens "
                                 f"(max_length {self.max_length})")
            rows.append(((ctx + cont)[-(self.max_length + 1):], len(cont)))
        # Longest first (as HFLM): batches hold similar lengths, so little padding per bucket.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, res in zip(idx, self.runner.score([rows[i] for i in idx])):
                out[i] = res
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ----------------------------------------------------------------------------
    def _generate(self, prompts, max_new: int, *, eos_ids, temperature: float, seed: int, stop=None):
        """KV-cache generation (infer/), or the full-forward loop (scoring.Runner) where infer
        cannot run: a model stored with scanned layers, or a prompt plus its new tokens past
        max_position_embeddings (a raised --max-length). The batch is padded to batch_size with
        copies of the first prompt so every chunk reuses one compiled program."""
        cfg = self.model.cfg
        if self.model.rt.scan_layers or max(len(p) for p in prompts) + max_new > cfg.max_position_embeddings:
            return self.runner.generate_ids(prompts, max_new, eos_ids=eos_ids, temperature=temperature, seed=seed,
                                            stop=stop)
        padded = list(prompts) + [prompts[0]] * (self.batch_size - len(prompts))
        out = kv_generate_ids(self.model, padded, max_new, Sampling(temperature=temperature), seed, list(eos_ids),
                              self.tokenizer.pad_id)
        return out[:len(prompts)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch never mixes generation settings
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idx in groups.values():
            # lm-eval's own reading of the settings (aliases of max_gen_toks, do_sample vs temperature).
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = list(kwargs.pop("until"))
            max_new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ignored = sorted(set(kwargs) & {"top_p", "top_k", "min_p", "num_beams", "repetition_penalty"})
            if ignored:
                log.warning("Llama4LM: the fallback decoder ignores %s", ignored)
            if self.max_length - max_new <= 0:
                raise ValueError(f"max_gen_toks {max_new} must be below max_length {self.max_length}")
            ctx_ids = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in idx}
            idx = sorted(idx, key=lambda i: -len(ctx_ids[i]))
            stop = (lambda ids: any(t and t in self.tok_decode(ids) for t in until)) if until else None
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                new = self.generate_fn([ctx_ids[i] for i in chunk], max_new, eos_ids=[self.eot_token_id],
                                       temperature=temperature, seed=self.seed + start, stop=stop)
                for i, ids in zip(chunk, new):
                    text = cut_at_stop(self.tok_decode([t for t in ids if t != self.eot_token_id]), until)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

"""Held-out transcript loss of an audio_tiny run (or its text-only baseline), split by target.

    PYTHONPATH=. python tools/audio_tiny_eval.py runs/audio_tiny experiments/audio_tiny.yaml
    PYTHONPATH=. python tools/audio_tiny_eval.py runs/audio_tiny_text experiments/audio_tiny_text.yaml

Loads the run's newest checkpoint (params only), reads the experiment's `tones` source as the
trainer does (same tokenizer, clip reading, held-out split, packed eval rows), and reports the
mean cross entropy (nats) over the held-out rows' loss targets: all of them (the trainer's
`eval/loss/tones`, but over every held-out row), the digit targets only, the end-of-document
targets only, and the digits of documents that begin in their row (`digits_whole`). A model that
cannot hear the clip cannot beat ln 10 ≈ 2.303 on the digits. Packing cuts documents at row
boundaries, and a row never sees the previous one: the transcript of a document whose clip began
in the previous row is partly unknowable even with audio, which `digits_whole` leaves out.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama4_jax.config import load_experiment
from llama4_jax.data.pipeline import build_mixture
from llama4_jax.model.store import load_any, model_from_flat
from llama4_jax.train.loss import token_losses
from llama4_jax.train.run import build_tokenizer, clip_config
from llama4_jax.train.step import media_fields


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("experiment")
    ap.add_argument("--source", default="tones")
    args = ap.parse_args()
    t0 = time.perf_counter()
    exp = load_experiment(args.experiment)
    cfg, flat, rt = load_any(args.run)
    model = model_from_flat(cfg, flat, rt)
    tokenizer = build_tokenizer(exp.data)
    stage = exp.curriculum.resolved_stages()[-1]
    data = build_mixture({args.source: exp.data.sources[args.source]}, tokenizer, seed=exp.seed,
                         seq_len=stage.seq_len, global_batch=stage.batch_size, prefetch=0,
                         audio_config=clip_config(exp, tokenizer), log=lambda *_: None)

    @jax.jit
    def losses(batch):
        extra = {k: batch[k] for k in media_fields(batch)}
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"], **extra)
        return token_losses(logits, batch["targets"]) * batch["loss_mask"]

    digits = np.array([tokenizer.encode(d)[0] for d in "0123456789"])
    sums = {"all": 0.0, "digits": 0.0, "end": 0.0, "digits_whole": 0.0}
    counts = dict.fromkeys(sums, 0)
    for batch in data.eval_batches(args.source):
        tok = np.asarray(losses({k: jnp.asarray(v) for k, v in batch.items()}))
        on = batch["loss_mask"] > 0
        seg, pos = batch["segment_ids"], batch["positions"]
        # documents whose first token (position 0) is in the row: their whole clip is in it
        whole = np.stack([np.isin(seg[r], seg[r][(pos[r] == 0) & (seg[r] > 0)]) for r in range(len(seg))])
        is_digit = on & np.isin(batch["targets"], digits)
        for name, sel in (("all", on), ("digits", is_digit), ("end", on & (batch["targets"] == tokenizer.eos_id)),
                          ("digits_whole", is_digit & whole)):
            sums[name] += float(tok[sel].sum())
            counts[name] += int(sel.sum())
    out = {f"loss/{k}": sums[k] / max(counts[k], 1) for k in sums}
    out.update({f"targets/{k}": counts[k] for k in counts}, seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Hooks the task YAMLs in this folder name with `!function llama4_jax.evals.tasks.hooks.<name>`.

The data of every task is a JSONL file in this folder: lm-eval's `custom_dataset` hook reads it
here instead of fetching a dataset from the hub (there is no network), and whatever the current
directory is. The code tasks score with our sandbox (`evals/passk.py`) because lm-eval's
`code_eval` metric is itself downloaded from the hub.
"""

from __future__ import annotations

import json

from ..passk import score_doc
from . import TASKS_DIR


def read_jsonl(file: str) -> list[dict]:
    path = TASKS_DIR / file
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_jsonl(file: str, split: str = "test", **_metadata):
    """`custom_dataset`: lm-eval calls it with the task's metadata and `dataset_kwargs`."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_jsonl(file))})


def keep_all(resps, docs):
    """A filter that keeps every repeat's completion (lm-eval's default keeps the first only)."""
    return resps


def _pass_at(ks):
    def process_results(doc, results):
        (completions,) = results  # one request per doc; its repeats, all kept by `keep_all`
        return score_doc(doc, completions, ks)
    return process_results


process_pass1 = _pass_at((1,))
process_pass1_pass5 = _pass_at((1, 5))

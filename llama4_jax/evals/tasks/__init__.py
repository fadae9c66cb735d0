"""The offline tasks shipped with the package: YAML for lm-eval's TaskManager (`include_path`)
and their data as JSONL beside them. `task_manager()` knows these and lm-eval's own tasks."""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def local_task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_manager(**kwargs):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), **kwargs)

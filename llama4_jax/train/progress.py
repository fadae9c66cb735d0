"""A rich progress bar per curriculum stage, with ETA and the latest loss."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageProgress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        self._task = None
        self._start = 0

    def start(self, plan, step: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn())
            self._bar.start()
        self._start = plan.start
        self._task = self._bar.add_task(f"{plan.index + 1}. {plan.name}", total=plan.steps,
                                        completed=step - plan.start, loss="…")

    def update(self, step: int, loss: float | None) -> None:
        if self._task is None:
            return
        fields = {} if loss is None else {"loss": f"{loss:.3f}"}
        self._bar.update(self._task, completed=step - self._start, **fields)

    def finish(self) -> None:
        self._task = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

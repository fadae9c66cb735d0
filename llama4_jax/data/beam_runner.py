"""`llama4-jax data prepare --runner beam`: the token store's per-file transform on Apache Beam.

The pipeline is one `Map` over the shard jobs: each element is one input file, and the transform
is `store.prepare_shard` (passed in), the very function the local runner calls, writing the same shard files
(so the store is byte-identical to a local one). Listing the inputs, deciding what is current,
and the finishing step (document indexes, manifest) stay on the launching machine, in
`store.prepare_source`. The output directory must be one the workers can write and the launcher
read (a shared or mounted filesystem on a cluster).

Beam is an optional extra (`pip install llama4-jax[beam]`): imported only here, only when asked
for. With no `--runner` among the Beam options, the pipeline runs on Beam's in-process
`FnApiRunner`, named explicitly (2.77's default DirectRunner first tries to download its Prism
runner); `--runner=DataflowRunner` / `FlinkRunner` / `SparkRunner` (+ their options) run it there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..errors import DataError


def _error_path(job) -> Path:
    return Path(job.out_dir) / "shards" / f"{job.index:05d}.error"


class _Prepare:
    """The Map body. A user error is written beside the shard (`<k>.error`, on the filesystem the
    launcher reads) instead of raised: Beam would wrap it in its own multi-line error."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, job):
        try:
            self.transform(job)
        except DataError as e:
            _error_path(job).write_text(str(e))
        return job.index


def run_with_beam(jobs: Sequence, beam_args: Sequence[str], transform: Callable) -> None:
    """Runs `transform(job)` (store.prepare_shard) for every job as a Beam pipeline; DataError
    (one line, the first input's in order) on a bad input."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    except ImportError as e:
        raise DataError("--runner beam needs Apache Beam: pip install 'llama4-jax[beam]' "
                        f"(in its own environment: see the README) ({e})") from e
    options = PipelineOptions(list(beam_args))
    runner = None
    if options.view_as(StandardOptions).runner is None:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        runner = FnApiRunner()
    for job in jobs:
        _error_path(job).unlink(missing_ok=True)
    with beam.Pipeline(runner=runner, options=options) as pipeline:
        _ = (pipeline
             | "jobs" >> beam.Create(list(jobs))
             | "spread" >> beam.Reshuffle()  # one input file per work item, across the workers
             | "prepare" >> beam.Map(_Prepare(transform)))
    for job in sorted(jobs, key=lambda j: j.index):
        path = _error_path(job)
        if path.is_file():
            message = path.read_text()
            path.unlink()
            raise DataError(message)

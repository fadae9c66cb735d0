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

import re
from typing import Callable, Sequence

from ..errors import DataError


class _Prepare:
    """The Map body: user errors travel back as values (Beam wraps raised ones in its own)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, job):
        try:
            self.transform(job)
            return job.index, None
        except DataError as e:
            return job.index, str(e)


def run_with_beam(jobs: Sequence, beam_args: Sequence[str], transform: Callable) -> None:
    """Runs `transform(job)` (store.prepare_shard) for every job as a Beam pipeline; DataError
    (one line) on a bad input."""
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
    errors: list[str] = []
    try:
        with beam.Pipeline(runner=runner, options=options) as pipeline:
            results = (pipeline
                       | "jobs" >> beam.Create(list(jobs))
                       | "spread" >> beam.Reshuffle()  # one file per work item, across workers
                       | "prepare" >> beam.Map(_Prepare(transform))
                       | "errors" >> beam.Filter(lambda r: r[1] is not None)
                       | "one" >> beam.combiners.ToList())
            if runner is not None:  # in-process: the errors can come back to this process
                results | "collect" >> beam.Map(errors.extend)
    except Exception as e:  # a failure that is not a user error keeps Beam's message
        found = re.search(r"DataError: (.*?)(?: \[while running|$)", str(e), re.S)
        if found:
            raise DataError(found.group(1).strip()) from e
        raise
    if errors:
        first = sorted(errors)[0]
        raise DataError(first[1] if isinstance(first, tuple) else first)

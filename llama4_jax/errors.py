"""User errors: one base type, caught once by the CLI (one line on stderr, exit 2).

Every mistake a user can fix — a bad YAML key, a missing file, a mesh that does not fit, a
checkpoint of another model — raises a subclass of `UserError` whose `str()` is one line naming
the file, key or tensor. Anything else is an internal failure and keeps its traceback. The
subclasses also derive from ValueError, so library callers that caught ValueError still do.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; `str()` is one line."""

    def __init__(self, msg: str = ""):
        super().__init__(" ".join(part.strip() for part in str(msg).splitlines()))


class ConfigError(UserError):
    """An experiment YAML or a `--set` override is wrong (`<file>: <key.path>: <problem>`)."""


class DataError(UserError):
    """A data source cannot be read (missing file, empty source, malformed record)."""


class CheckpointError(UserError):
    """A checkpoint or params directory cannot be used (damaged, another model, not one at all)."""


class ConvertError(UserError):
    """A Hugging Face directory cannot be converted (bad config.json, missing tensor, bad shape)."""


class MeshError(UserError):
    """The mesh cannot be built for these devices / this model."""


class DistributedError(UserError):
    """jax.distributed cannot start from the given settings."""


class GenerateError(UserError):
    """A generation request that cannot be served (bad prompt, sampling setting or source)."""


class RunError(UserError):
    """The run setup is inconsistent (workdir state, batch layout, resume mode)."""


class EvalError(UserError):
    """An evaluation cannot run as asked (missing model source, unknown task, no sandbox)."""


class OutOfMemoryError(UserError):
    """The device ran out of memory compiling or running a step (what ran out, how much was asked,
    what to change)."""

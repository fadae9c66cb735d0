"""Rematerialisation policies by name: what each block keeps from its forward pass for the
backward pass, and what it recomputes.

| name       | saved per block                                  | recomputed in the backward pass   |
|------------|--------------------------------------------------|-----------------------------------|
| `none`     | everything autodiff needs (no checkpoint)        | nothing                           |
| `full`     | the block's inputs                               | the whole block                   |
| `minimal`  | matmul outputs without batch dims (the 2-D       | attention scores / probabilities, |
|            | projections: q/k/v/o, MLP and shared expert)     | norms, activations, the router    |
| `save_moe` | the MoE block's output (tagged `MOE_OUT`)        | attention, norms, the dense MLP   |
| `offload`  | as `minimal`, but in host memory (`pinned_host`) | as `minimal`                      |

Every policy computes the same function and the same gradients (tests/test_remat.py checks it
and the ordering of compiled temporaries: full < minimal < none). `offload` needs a backend
whose runtime can place buffers in pinned host memory (GPU, TPU); on CPU there is no separate
host memory to offload to, so it is refused with a one-line error.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax

from ..errors import ConfigError

RematPolicy = Literal["none", "full", "minimal", "save_moe", "offload"]
REMAT_POLICIES: tuple[str, ...] = get_args(RematPolicy)
MOE_OUT = "moe_out"  # checkpoint_name of the MoE block output (what `save_moe` keeps)
_NO_OFFLOAD = ("cpu",)  # backends without a pinned-host memory space to offload to


def policy_name(value: bool | str) -> str:
    """A policy name; `true` / `false` (the boolean `remat` of older YAMLs and checkpoint files)
    read as `full` / `none`."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {value!r}; choose one of {', '.join(REMAT_POLICIES)}")
    return value


def check_backend(name: str, backend: str | None = None) -> None:
    """Refuse `offload` where saved residuals cannot go to host memory."""
    backend = backend or jax.default_backend()
    if name == "offload" and backend in _NO_OFFLOAD:
        raise ConfigError(f"model.runtime.remat: offload needs host-memory offloading, which the {backend} "
                          "backend does not support (use minimal or full)")


def checkpoint_policy(name: str):
    """The `jax.checkpoint` policy of a named policy (`none` → None: no checkpoint at all;
    `full` → None: save nothing but the inputs)."""
    cp = jax.checkpoint_policies
    if name in ("none", "full"):
        return None
    if name == "minimal":
        return cp.dots_with_no_batch_dims_saveable
    if name == "save_moe":
        return cp.save_only_these_names(MOE_OUT)
    if name == "offload":
        check_backend(name)
        return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"unknown remat policy {name!r}")

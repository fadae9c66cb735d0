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

`remat` may also name a policy per kind of block: `{moe: full, dense: minimal}` (by feed-forward
kind) or `{global: full, chunked: save_moe}` (by attention kind: global layers hold the long-range
residuals). A kind left out gets `none`. Inside a scanned layer group each block position keeps
its own policy, so one group can mix them.

Every policy computes the same function and the same gradients (tests/test_remat.py checks it
and the ordering of compiled temporaries: full < minimal < none). `offload` needs a backend
whose runtime can place buffers in pinned host memory (GPU, TPU); on CPU there is no separate
host memory to offload to, so it is refused with a one-line error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Union, get_args

import jax

from ..errors import ConfigError

RematPolicy = Literal["none", "full", "minimal", "save_moe", "offload"]
REMAT_POLICIES: tuple[str, ...] = get_args(RematPolicy)
BLOCK_KINDS = (("moe", "dense"), ("global", "chunked"))  # the two ways to name block kinds
# A policy for every block, or (kind, policy) pairs sorted by kind (hashable: it is static config).
RematSpec = Union[RematPolicy, tuple[tuple[str, RematPolicy], ...]]
MOE_OUT = "moe_out"  # checkpoint_name of the MoE block output (what `save_moe` keeps)
_NO_OFFLOAD = ("cpu",)  # backends without a pinned-host memory space to offload to


def policy_name(value) -> RematSpec:
    """A policy name, or per-kind policies as sorted (kind, name) pairs (from a mapping or a list
    of pairs, as runtime.json stores them); `true` / `false` (the boolean `remat` of older YAMLs
    and checkpoint files) read as `full` / `none`."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if isinstance(value, str):
        if value not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {value!r}; choose one of {', '.join(REMAT_POLICIES)}")
        return value
    pairs = dict(value.items() if isinstance(value, Mapping) else value)
    family = next((f for f in BLOCK_KINDS if set(pairs) <= set(f)), None)
    if not pairs or family is None:
        raise ValueError(f"remat by block kind takes the keys {' / '.join(BLOCK_KINDS[0])} or "
                         f"{' / '.join(BLOCK_KINDS[1])} (one pair, not both), got {sorted(pairs)}")
    named = {k: policy_name(v) for k, v in pairs.items()}
    if not all(isinstance(v, str) for v in named.values()):
        raise ValueError("remat: a block kind's policy is one name")
    return tuple(sorted(named.items()))


def policy_for(spec: RematSpec, moe: bool, chunked: bool) -> str:
    """The policy of one block: its feed-forward kind (moe / dense) or attention kind (global /
    chunked) looked up in a per-kind spec; a kind not named gets `none`."""
    if isinstance(spec, str):
        return spec
    pairs = dict(spec)
    return pairs.get("moe" if moe else "dense", pairs.get("chunked" if chunked else "global", "none"))


def policies(spec: RematSpec) -> set[str]:
    """Every policy name a spec uses."""
    return {spec} if isinstance(spec, str) else {v for _, v in spec}


def check_backend(spec: RematSpec, backend: str | None = None) -> None:
    """Refuse `offload` where saved residuals cannot go to host memory."""
    backend = backend or jax.default_backend()
    if "offload" in policies(spec) and backend in _NO_OFFLOAD:
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

"""Shared fixtures: random tiny Hugging Face Llama 4 checkpoints (torch + transformers, `[hf]` extra)."""

from __future__ import annotations

import functools
import os
import sys

import pytest

# One persistent XLA compilation cache for the whole session: every test process (the xdist
# workers inherit the controller's environment) and every subprocess a test starts (they inherit
# the environment too, unless a test strips JAX_* on purpose, as test_multihost.py does) reuses
# a program any of them compiled before. The directory lies in this session's pytest temp dir,
# so each run starts cold. Processes share it safely: jax writes an entry without a lock (a lock
# comes only with a size limit, which rescans the whole directory on every write), so a reader
# may see an entry half-written by another process; it is zlib-compressed, the truncated stream
# fails to decompress, and jax then warns and compiles the program itself.
XLA_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


@pytest.hookimpl(trylast=True)  # after the tmpdir plugin has set up the session's temp dir
def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker: the controller set the environment
        return
    cache = config._tmp_path_factory.getbasetemp() / "xla-cache"  # xdist workers' temp dirs sit beside it
    cache.mkdir(exist_ok=True)
    os.environ.update(XLA_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=str(cache))
    if "jax" in sys.modules:  # imported already (by a plugin): it read its environment then
        import jax

        for k, v in {**XLA_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR": str(cache)}.items():
            jax.config.update(k.lower(), v if k.endswith("DIR") else int(v))


@pytest.fixture(scope="session", autouse=True)
def peak_flops_measured_once():
    """The trainer measures the host's peak FLOP/s (six 2048² f32 matmuls: 2-4 CPU s, 5-14 s wall
    on the loaded 2-core host) when a run starts; the host does not change within a test process,
    so the first measurement is reused by every later run in this process (still a real
    measurement, so MFU stays real)."""
    from llama4_jax.train import metrics

    real = metrics.measure_peak_flops
    metrics.measure_peak_flops = functools.cache(real)
    yield
    metrics.measure_peak_flops = real


def _randomize(model, seed: int) -> None:
    """Every weight ~ N(0, 0.2²), norm weights ~ 1 + N(0, 0.2²): far from init, so nothing cancels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


def _randomized_and_saved(model, seed: int, out):
    """`_randomize` the model, `save_pretrained` it into `out` → (model, out)."""
    _randomize(model, seed)
    model.save_pretrained(out)
    return model, out


@pytest.fixture(scope="session")
def make_hf(tmp_path_factory):
    """Factory: (name, seed=0, **Llama4TextConfig kwargs) → (eval-mode torch model, saved directory).

    The model uses eager attention (the reference implementation) and is saved with
    `save_pretrained` as a single model.safetensors in float32.
    """
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def make(name: str, seed: int = 0, **kw):
        hc = transformers.Llama4TextConfig(**kw)
        hc._attn_implementation = "eager"
        return _randomized_and_saved(transformers.Llama4ForCausalLM(hc).eval(), seed, tmp_path_factory.mktemp(name))

    return make


@pytest.fixture(scope="session")
def make_hf_vlm(tmp_path_factory):
    """Factory: (name, text=Llama4TextConfig kwargs, vision=Llama4VisionConfig kwargs, seed=0, **Llama4Config
    kwargs) → (eval-mode Llama4ForConditionalGeneration with random weights, saved directory).

    Eager attention everywhere; saved with `save_pretrained` (one float32 model.safetensors)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def make(name: str, text: dict, vision: dict, seed: int = 0, **kw):
        hc = transformers.Llama4Config(text_config=text, vision_config=vision, **kw)
        hc._attn_implementation = "eager"
        hc.text_config._attn_implementation = "eager"
        hc.vision_config._attn_implementation = "eager"
        model = transformers.Llama4ForConditionalGeneration(hc).eval()
        return _randomized_and_saved(model, seed, tmp_path_factory.mktemp(name))

    return make


@pytest.fixture(scope="session")
def random_flat():
    """Factory: (ModelConfig, seed=0, std=0.2) → flat host arrays for `store.model_from_flat`.

    Drawn with numpy from `store.state_shapes` (no eager JAX init, which is slow op by op): weights
    ~ N(0, std²), norm scales ~ 1 + N(0, std²), the MoE router bias (state, not a parameter) zero.
    """
    import numpy as np

    from llama4_jax.model import store

    def make(cfg, seed: int = 0, std: float = 0.2, rt=None):
        rng = np.random.default_rng(seed)
        flat = {}
        for name, s in store.state_shapes(cfg, rt).items():
            if name.endswith(".ffn.bias"):
                flat[name] = np.zeros(s.shape, s.dtype)
            else:
                base = 1.0 if name.endswith(".scale") else 0.0
                flat[name] = (base + std * rng.standard_normal(s.shape)).astype(s.dtype)
        return flat

    return make


@pytest.fixture(scope="session")
def stack_for_scan():
    """Function: (unrolled ModelConfig, its flat arrays) → the same arrays in the flat layout of
    `RuntimeConfig(scan_layers=True)` (per-layer arrays stacked along the scan-group axis)."""
    import numpy as np

    from llama4_jax.model import store
    from llama4_jax.model.config import RuntimeConfig

    def stack(cfg, flat: dict) -> dict:
        scan = RuntimeConfig(scan_layers=True)
        out = {k: v for k, v in flat.items() if not k.startswith("groups.")}
        rows: dict[str, dict] = {}
        for layer in range(cfg.num_layers):
            prefix, g = cfg.layer_slot(layer, True)
            src = store.flat_name(cfg.layer_slot(layer, False)[0]) + "."
            for k, v in flat.items():
                if k.startswith(src):
                    rows.setdefault(store.flat_name(prefix) + "." + k[len(src):], {})[g] = v
        out.update({k: np.stack([r[g] for g in range(len(r))]) for k, r in rows.items()})
        shapes = store.state_shapes(cfg, scan)
        for k, v in out.items():
            assert tuple(v.shape) == tuple(shapes[k].shape), (k, v.shape, shapes[k].shape)
        return out

    return stack

"""`llama4-jax train`: everything decided before training.

Phases: 1 config → 2 workdir checks → 3 processes (jax.distributed) + mesh → 4 data →
5 model + state (+ restore) → 6 stage loop (train, log, eval, checkpoint) → 7 summary. Every user
mistake surfaces before anything is written to the workdir. Phases 1-3 are `Run` (here), the
data of phase 4 is `build_data`; 5-7 live in loop.py.

`--dry-run` stops after 3 and plans on an abstract mesh: the experiment's mesh is planned even
when this machine has fewer devices (then the smallest device count the mesh fits), and per-device
memory comes from shapes and shardings alone, without allocating anything.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from .. import parallel
from ..config import dump_resolved, load_experiment
from ..data.audio import AUDIO, AUDIO_END, AUDIO_START, ClipConfig
from ..data.images import IMAGE_END, IMAGE_START, PATCH, ImageConfig
from ..data.pipeline import audio_token_ids, build_mixture, image_token_ids
from ..data.tokenizer import make_tokenizer
from ..errors import ConfigError, RunError
from ..model import flops as flops_lib
from ..model.remat import check_backend
from ..parallel import distributed
from .curriculum import plan_stages
from .optimizer import build_optimizer, freeze_by_stage, lr_schedule
from .state import abstract_state, init_state
from .step import BalancingConfig


# --- 1-2: config and workdir --------------------------------------------------------------
def has_checkpoints(workdir: Path) -> bool:
    """Whether a run directory holds at least one checkpoint step (the one resume test)."""
    ck = Path(workdir) / "checkpoints"
    return ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir())


def _check_resume(workdir: Path, mode: str) -> None:
    if mode == "never" and has_checkpoints(workdir):
        raise RunError(f"{workdir / 'checkpoints'} already holds checkpoints and --resume never was given "
                       "(use another --workdir, or --resume auto to continue)")


# --- 3: mesh --------------------------------------------------------------------------------
def planned_device_count(mesh_cfg, available: int) -> int:
    """Devices a dry run plans for: the available ones if the mesh fits them, else the fewest
    the mesh fits (its fixed axes, with a -1 axis at 1)."""
    try:
        mesh_cfg.resolve(available)
        return available
    except ConfigError:
        return math.prod(max(getattr(mesh_cfg, a), 1) for a in parallel.MESH_AXES)


def _check_mesh(sizes: dict, rules: dict, cfg, plans) -> list[str]:
    """Divisibility of the model and of every stage's batch; returns replication notes."""
    notes = parallel.check_fit(parallel.model_dims(cfg), sizes, rules)
    div = parallel.batch_divisor(sizes, rules)
    ctx = math.prod(sizes[a] for a in parallel.rule_axes(rules, "length") if a not in parallel.rule_axes(rules, "batch"))
    for p in plans:
        if ctx > 1 and p.seq_len % (2 * ctx):
            raise RunError(f"curriculum.stages[{p.index}].seq_len={p.seq_len} is not a multiple of 2 × the {ctx} "
                           f"context shards of mesh {sizes} (the zig-zag layout cuts a row into {2 * ctx} pieces)")
        if p.batch_size % div:
            raise RunError(f"curriculum.stages[{p.index}].batch_size={p.batch_size} is not divisible by the "
                           f"{div} batch shards of mesh {sizes}")
        if p.batch_size % (div * p.microbatches):  # every shard feeds every microbatch equally
            raise RunError(f"curriculum.stages[{p.index}].microbatches={p.microbatches}: each of the {div} batch "
                           f"shards of mesh {sizes} holds {p.batch_size // div} rows, not a multiple of it")
        if p.batch_size % jax.process_count():
            raise RunError(f"stage {p.name}: batch_size {p.batch_size} not divisible by {jax.process_count()} processes")
    return notes


def _mesh(exp, cfg, plans, devices=None, plan_only=False):
    n = len(devices) if devices is not None else jax.device_count()
    if plan_only:
        n = planned_device_count(exp.mesh, n)
    sizes = exp.mesh.resolve(n)
    rules = parallel.merged_rules(exp.mesh.rules)
    notes = _check_mesh(sizes, rules, cfg, plans)
    if plan_only:
        return parallel.abstract_mesh(sizes), rules, sizes, notes
    mesh = parallel.make_mesh(sizes, devices)
    if jax.process_count() > 1:
        parallel.check_batch_layout(mesh, rules)
    return mesh, rules, sizes, notes


# --- 4: data --------------------------------------------------------------------------------
def store_dir(data_cfg, workdir) -> Path:
    """Where the run's token store lives: data.store_dir, <data.cache_dir>/store, <workdir>/data-cache."""
    if data_cfg.store_dir:
        return Path(data_cfg.store_dir)
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir) / "store"
    return Path(workdir) / "data-cache"


def build_tokenizer(data_cfg):
    tok = data_cfg.tokenizer
    return make_tokenizer(tok.type, str(tok.path) if tok.path else None)


def new_workdir_paths(data_cfg, workdir) -> list[Path]:
    """What setting up a run may create in the workdir and a failed setup must remove again: the
    workdir itself if it does not exist yet, else the default token store in it if that does not
    (a store at data.store_dir or data.cache_dir is the user's cache and stays)."""
    workdir = Path(workdir)
    if not workdir.exists():
        return [workdir]
    store = store_dir(data_cfg, workdir)
    return [store] if store == workdir / "data-cache" and not store.exists() else []


def build_data(exp, plans, workdir):
    """(tokenizer, the mixture iterator positioned at stage 0) for this process's rows, reading
    the token store (sources not prepared yet are prepared into it first)."""
    tokenizer = build_tokenizer(exp.data)
    first = plans[0]
    image_cfg, audio_cfg = image_config(exp, tokenizer), clip_config(exp, tokenizer)
    it = build_mixture(exp.data.sources, tokenizer, seed=exp.seed, seq_len=first.seq_len,
                       global_batch=first.batch_size, weights=first.mixture, stage_index=0,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       store_dir=store_dir(exp.data, workdir), prepare_workers=exp.data.workers,
                       prefetch=exp.data.prefetch, image_config=image_cfg, audio_config=audio_cfg)
    return tokenizer, it


def _check_token_ids(ids: dict[str, int], tower_cfg, section: str, pairs) -> None:
    """ConfigError unless each (token, field) of `pairs` has tower_cfg.field == the tokenizer's id."""
    for token, field in pairs:
        if ids[token] != getattr(tower_cfg, field):
            raise ConfigError(f"{section}.{field}: {getattr(tower_cfg, field)} is not the tokenizer's id of "
                              f"{token} ({ids[token]})")


def image_config(exp, tokenizer) -> ImageConfig | None:
    """How images are tiled for the experiment's vision tower (None: no image-text source), after
    checking that the tokenizer's image tokens are the ids the tower's config names."""
    if exp.vision is None or not any(s.resolved_kind == "image_text" for s in exp.data.sources.values()):
        return None
    v = exp.vision.build()
    _check_token_ids(image_token_ids(tokenizer), v, "vision.tower",
                     ((PATCH, "image_token_id"), (IMAGE_START, "boi_token_id"), (IMAGE_END, "eoi_token_id")))
    return ImageConfig(tile_size=v.image_size, max_patches=exp.vision.max_patches,
                       resize_to_max_canvas=exp.vision.resize_to_max_canvas, patch_size=v.patch_size,
                       pixel_shuffle_ratio=v.pixel_shuffle_ratio)


def clip_config(exp, tokenizer) -> ClipConfig | None:
    """How clips are read for the experiment's audio encoder (None: no audio-text source), after
    checking that the tokenizer's audio tokens are the ids the encoder's config names."""
    if exp.audio is None or not any(s.resolved_kind == "audio_text" for s in exp.data.sources.values()):
        return None
    a = exp.audio.build()
    _check_token_ids(audio_token_ids(tokenizer), a, "audio.encoder",
                     ((AUDIO, "audio_token_id"), (AUDIO_START, "boa_token_id"), (AUDIO_END, "eoa_token_id")))
    return ClipConfig(sample_rate=a.sample_rate, clip_samples=a.clip_samples, tokens_per_clip=a.tokens_per_clip,
                      resample=exp.audio.resample)


# --- 5: model and state ---------------------------------------------------------------------
def _make_tx_factory(exp, stages, total_steps):
    schedule = lr_schedule(exp.optimizer, stages, total_steps)
    dt = jnp.dtype(exp.precision.opt_state_dtype)
    lr_scale = exp.vision.lr_scale if exp.vision is not None else 1.0
    audio_scale = exp.audio.lr_scale if exp.audio is not None else 1.0
    if not any(st.trainable for st in stages) and lr_scale == audio_scale == 1.0:
        return (lambda params: build_optimizer(exp.optimizer, params, schedule, dt)), schedule
    ends = list(itertools.accumulate(st.steps for st in stages))
    trainable = [st.trainable for st in stages]
    scale = {"vision": lr_scale, "projector": lr_scale, "audio": audio_scale, "audio_projector": audio_scale}
    return (lambda params: freeze_by_stage(build_optimizer(exp.optimizer, params, schedule, dt), ends,
                                           trainable, scale)), schedule


def init_sharded(cfg, seed: int, make_tx, shardings, rt=None):
    """A fresh TrainState made by one jitted program straight into `shardings`: each device
    computes only its own shards, so no device ever holds the whole model (eager init then
    `device_put` would first build all of a 400B-parameter model on one device). The values are
    `init_state`'s up to ~1e-8 (the truncated normal's erf-inverse fuses differently under jit)."""
    return jax.jit(lambda: init_state(cfg, seed, make_tx, rt=rt)[1], out_shardings=shardings)()


# --- the run ---------------------------------------------------------------------------------
class Run:
    """Everything decided before training: config, stages, processes, mesh, rules, optimizer.

    Typed inputs: the experiment file and its `--set` overrides, the workdir (default
    runs/<name>), the resume mode ("auto" | "never"). `devices` restricts the mesh to a subset
    (tests); `plan_only` (a dry run) plans on an abstract mesh and never starts jax.distributed."""

    def __init__(self, experiment, *, overrides=(), workdir=None, resume: str = "auto", plan_only: bool = False,
                 devices=None):
        if resume not in ("auto", "never"):
            raise RunError(f"resume mode {resume!r}: expected auto or never")
        self.plan_only, self.resume = plan_only, resume
        self.exp = load_experiment(experiment, overrides).resolved()
        self.cfg, self.rt = self.exp.to_model_config(), self.exp.to_runtime()
        b = self.exp.balancing
        self.balancing = BalancingConfig(b.aux_loss_coef, b.z_loss_coef, b.bias_update_rate)
        self.plans = plan_stages(self.exp.curriculum)
        self.workdir = Path(workdir or Path("runs") / self.exp.name).absolute()
        _check_resume(self.workdir, resume)
        # Before the first device query: jax.distributed must start before the backend does.
        self.processes = "planning only" if plan_only else distributed.initialize()
        if not plan_only:  # after start-up (it asks the backend); a dry run may plan for another backend
            check_backend(self.rt.remat)
        self.mesh, self.rules, self.mesh_sizes, self.mesh_notes = _mesh(
            self.exp, self.cfg, self.plans, devices, plan_only)
        parallel.set_rules(self.rules)  # the activation constraints inside the model read these
        stages = self.exp.curriculum.resolved_stages()
        self.make_tx, self.schedule = _make_tx_factory(self.exp, stages, self.plans[-1].end)

    @property
    def resuming(self) -> bool:
        """Whether this run continues from checkpoints in its workdir."""
        return self.resume == "auto" and has_checkpoints(self.workdir)

    # -- dry run
    def memory_plan(self) -> dict[str, tuple[int, int]]:
        """{params | opt_state | extra: (bytes per device, bytes in total)}, from shapes only."""
        _, abstract, _ = abstract_state(self.cfg, self.make_tx, self.rt)
        shard = parallel.tree_shardings(abstract, self.mesh, self.rules)
        return {part: (parallel.per_device_bytes(getattr(abstract, part), getattr(shard, part)),
                       parallel.total_bytes(getattr(abstract, part))) for part in ("params", "opt_state", "extra")}
    def describe(self) -> str:
        total, active = flops_lib.param_counts(self.cfg)
        p0 = self.plans[0]
        fpt = flops_lib.flops_per_token(self.cfg, p0.seq_len)
        mem = self.memory_plan()
        n = math.prod(self.mesh_sizes.values())
        here = f"{jax.device_count()} {jax.devices()[0].platform} devices"
        where = f"over {here}" if n == jax.device_count() else f"over {n} devices (planned; this host has {here})"
        fmt = parallel.format_bytes
        per_dev = sum(d for d, _ in mem.values())
        lines = [dump_resolved(self.exp).rstrip(), "---",
                 f"parameters: {total:,} total, {active:,} active per token",
                 f"training FLOPs per token (seq {p0.seq_len}): {fpt:.4g}",
                 f"mesh: {self.mesh_sizes} {where}",
                 *(f"mesh note: {note}" for note in self.mesh_notes),
                 "state memory per device: " + ", ".join(
                     f"{label} {fmt(mem[part][0])}" for label, part in
                     (("params", "params"), ("optimizer", "opt_state"), ("other", "extra")))
                 + f"; total {fmt(per_dev)} (gradients and activations come on top)",
                 *(f"state bytes {label}: {mem[part][0]:,} per device of {mem[part][1]:,}" for label, part in
                   (("params", "params"), ("optimizer", "opt_state"), ("other", "extra"))),
                 "curriculum: " + ", ".join(f"{p.name} {p.steps} steps × {p.batch_size}×{p.seq_len}"
                                            + (f" (RoPE scaling ×{p.rope_scaling.factor:g})" if p.rope_scaling else "")
                                            for p in self.plans)]
        return "\n".join(lines)

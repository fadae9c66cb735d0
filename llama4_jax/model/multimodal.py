"""Early fusion: the text decoder with the vision tower in front of its embedding.

`Llama4Multimodal` is a `Llama4` (same variables under the same names, same training and
inference methods) plus `vision` (model/vision.py) and `projector`. Given `pixel_values`
[N, C, S, S] (every tile of the batch's images, in text order; padding tiles after the real
ones are allowed and unused), the projected features of all tiles, flattened in order, replace
the embeddings of the `image_token_id` placeholders (`<|patch|>`) in the order they appear
(row-major over the batch): HF's `masked_scatter`. For training, `pixel_values` [B, T, C, S, S]
gives each row its own tiles (so rows split over devices and microbatches with their images);
with `image_index` [B, L] as well (the training pipeline's packed rows, data/pipeline.py),
position (b, i) takes feature `image_index[b, i]` of row b's flattened tile features (−1: keep
the token embedding), so a row may begin in the middle of an image that an earlier row started.
Without `pixel_values` the call is the text model's, op for op: a text-only batch pays nothing
for the tower.

Audio (`cfg.audio`, model/audio.py) is fused the same way: `audio_values` [N, clip_samples]
(HF-style, all clips of the batch in text order) or per row [B, K, clip_samples] (with
`audio_index` [B, L] from the training pipeline) replace the `audio_token_id` placeholders
(`<|audio|>`, tokens_per_clip per clip) with the projected encoder features. A model may have
either tower or both; a call without `pixel_values` and `audio_values` is the text model's.

`build_model(cfg, rt, rngs)` gives the model a config describes (with a tower when
`cfg.vision` or `cfg.audio` is set). `text_loss_mask` drops the loss on image and audio positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .audio import AudioEncoder, AudioProjector
from .config import ModelConfig, RuntimeConfig
from .transformer import Llama4
from .vision import Projector, VisionTower


def fuse(x_BxLxD: jax.Array, mask_BxL: jax.Array, feats_MxD: jax.Array) -> jax.Array:
    """x with its masked rows replaced, in row-major order, by feats[0], feats[1], ...
    (placeholders beyond M, which the data pipeline refuses, would repeat the last feature)."""
    B, L, D = x_BxLxD.shape
    m = mask_BxL.reshape(-1)
    idx = jnp.clip(jnp.cumsum(m.astype(jnp.int32)) - 1, 0, feats_MxD.shape[0] - 1)
    rows = jnp.take(feats_MxD.astype(x_BxLxD.dtype), idx, axis=0)
    return jnp.where(m[:, None], rows, x_BxLxD.reshape(-1, D)).reshape(B, L, D)


def fuse_rows(x_BxLxD: jax.Array, mask_BxL: jax.Array, feats_BxMxD: jax.Array) -> jax.Array:
    """Per row: row b's masked positions take feats[b, 0], feats[b, 1], ... (each row owns its
    images, so rows can be split over devices and microbatches)."""
    idx_BxL = jnp.clip(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=1) - 1, 0, feats_BxMxD.shape[1] - 1)
    rows = jnp.take_along_axis(feats_BxMxD.astype(x_BxLxD.dtype), idx_BxL[..., None], axis=1)
    return jnp.where(mask_BxL[..., None], rows, x_BxLxD)


def fuse_indexed(x_BxLxD: jax.Array, index_BxL: jax.Array, feats_BxMxD: jax.Array) -> jax.Array:
    """Position (b, i) takes feats[b, index[b, i]] where index ≥ 0, else keeps x."""
    idx_BxL = jnp.clip(index_BxL, 0, feats_BxMxD.shape[1] - 1)
    rows = jnp.take_along_axis(feats_BxMxD.astype(x_BxLxD.dtype), idx_BxL[..., None], axis=1)
    return jnp.where((index_BxL >= 0)[..., None], rows, x_BxLxD)


class Llama4Multimodal(Llama4):
    def __init__(self, cfg: ModelConfig, rt: RuntimeConfig | None = None, *, rngs: nnx.Rngs):
        if cfg.vision is None and cfg.audio is None:
            raise ValueError("Llama4Multimodal needs a ModelConfig with a vision or an audio config")
        super().__init__(cfg, rt, rngs=rngs)
        if cfg.vision is not None:
            self.vision = VisionTower(cfg.vision, param_dtype=self.rt.pdtype, dtype=self.rt.dtype, rngs=rngs)
            self.projector = Projector(cfg.vision, cfg.hidden_size, param_dtype=self.rt.pdtype, rngs=rngs)
        if cfg.audio is not None:
            self.audio = AudioEncoder(cfg.audio, param_dtype=self.rt.pdtype, dtype=self.rt.dtype, rngs=rngs)
            self.audio_projector = AudioProjector(cfg.audio, cfg.hidden_size, param_dtype=self.rt.pdtype, rngs=rngs)

    def image_features(self, pixel_values_NxCxSxS: jax.Array) -> jax.Array:
        """Vision features before the projector [N, tokens_per_tile, vision_output_dim] (HF's
        `get_image_features`)."""
        return self.vision(pixel_values_NxCxSxS)

    def image_embeds(self, pixel_values_NxCxSxS: jax.Array) -> jax.Array:
        """Projected features of every tile, flattened in order: [N·tokens_per_tile, D]."""
        return self.projector(self.image_features(pixel_values_NxCxSxS)).reshape(-1, self.cfg.hidden_size)

    def audio_embeds(self, audio_values_NxS: jax.Array) -> jax.Array:
        """Projected features of every clip, flattened in order: [N·tokens_per_clip, D]."""
        return self.audio_projector(self.audio(audio_values_NxS)).reshape(-1, self.cfg.hidden_size)

    @staticmethod
    def _place(x_BxLxD, mask_BxL, values, index_BxL, embeds_fn, item_ndim: int) -> jax.Array:
        """x with one modality's features in place: `values` all items [N, ...] (row-major over
        the placeholders) or per row [B, K, ...] (placed by `index_BxL` when given, else by
        each row's placeholder order)."""
        if values.ndim == item_ndim + 2:
            B, K = values.shape[:2]
            feats = embeds_fn(values.reshape(B * K, *values.shape[2:]))
            feats_BxMxD = feats.reshape(B, -1, feats.shape[-1])
            if index_BxL is not None:
                return fuse_indexed(x_BxLxD, index_BxL, feats_BxMxD)
            return fuse_rows(x_BxLxD, mask_BxL, feats_BxMxD)
        return fuse(x_BxLxD, mask_BxL, embeds_fn(values))

    def fused_embeds(self, input_ids_BxL, pixel_values=None, image_index_BxL=None, audio_values=None,
                     audio_index_BxL=None) -> jax.Array:
        """Token embeddings with the image and audio features in place. `pixel_values` is either
        all tiles of the batch [N, C, S, S] (HF's layout: features fill the placeholders in
        row-major order), or per row [B, T, C, S, S] (row b's tiles fill row b's placeholders;
        rows with fewer tiles pad with any pixels, unused); with `image_index_BxL`, the per-row
        layout placed by that index instead of by placeholder order. `audio_values` likewise:
        [N, clip_samples] or [B, K, clip_samples], with `audio_index_BxL`."""
        x_BxLxD = self.embed_tokens(input_ids_BxL)
        if pixel_values is not None:
            x_BxLxD = self._place(x_BxLxD, input_ids_BxL == self.cfg.vision.image_token_id, pixel_values,
                                  image_index_BxL, self.image_embeds, 3)
        if audio_values is not None:
            x_BxLxD = self._place(x_BxLxD, input_ids_BxL == self.cfg.audio.audio_token_id, audio_values,
                                  audio_index_BxL, self.audio_embeds, 1)
        return x_BxLxD

    def hidden(self, input_ids_BxL, segment_ids_BxL=None, positions_BxL=None, *, pixel_values=None,
               image_index=None, audio_values=None, audio_index=None, embeds_BxLxD=None):
        if pixel_values is not None or audio_values is not None:
            embeds_BxLxD = self.fused_embeds(input_ids_BxL, pixel_values, image_index, audio_values, audio_index)
        return super().hidden(input_ids_BxL, segment_ids_BxL, positions_BxL, embeds_BxLxD=embeds_BxLxD)


def build_model(cfg: ModelConfig, rt: RuntimeConfig | None = None, *, rngs: nnx.Rngs) -> Llama4:
    """The model `cfg` describes: `Llama4Multimodal` when it has a vision tower or an audio
    encoder, else `Llama4`."""
    if cfg.vision is None and cfg.audio is None:
        return Llama4(cfg, rt, rngs=rngs)
    return Llama4Multimodal(cfg, rt, rngs=rngs)


def _span_mask(seq_BxL: jax.Array, start_id: int, end_id: int, placeholder_id: int) -> jax.Array:
    """True from each `start_id` through its `end_id`, and on any stray placeholder."""
    opened = jnp.cumsum(seq_BxL == start_id, axis=1) - jnp.cumsum(seq_BxL == end_id, axis=1)
    return (opened > 0) | (seq_BxL == end_id) | (seq_BxL == placeholder_id)


def text_loss_mask(inputs_BxL: jax.Array, targets_BxL: jax.Array, loss_mask_BxL: jax.Array,
                   cfg: ModelConfig) -> jax.Array:
    """`loss_mask` with image and audio positions dropped: every target from `<|image_start|>`
    through `<|image_end|>` (the processor writes them; the model is never asked to predict an
    image), likewise from `<|audio_start|>` through `<|audio_end|>`, and any stray placeholder.
    Text-only models get `loss_mask` back unchanged."""
    if cfg.vision is None and cfg.audio is None:
        return loss_mask_BxL
    seq = jnp.concatenate([inputs_BxL[:, :1], targets_BxL], axis=1)  # token i + 1 is target i
    inside = jnp.zeros(seq.shape, bool)
    if cfg.vision is not None:
        v = cfg.vision
        inside |= _span_mask(seq, v.boi_token_id, v.eoi_token_id, v.image_token_id)
    if cfg.audio is not None:
        a = cfg.audio
        inside |= _span_mask(seq, a.boa_token_id, a.eoa_token_id, a.audio_token_id)
    return loss_mask_BxL * (~inside[:, 1:]).astype(loss_mask_BxL.dtype)

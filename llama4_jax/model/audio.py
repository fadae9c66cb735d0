"""The audio encoder: log-mel front end, conv subsampling, a small transformer, and its projector.

No Hugging Face Llama 4 audio model exists, so this is the project's own (a Whisper-style
encoder, scaled down): `AudioConfig` (model/config.py) describes it.

Front end (in JAX, inside the model, so a training batch and an inference call both carry raw
waveforms [N, clip_samples] and one program computes everything from them):
  - a centred STFT: the clip padded with n_fft/2 zeros on each side, frames every hop_length
    samples, the periodic Hann window, `jnp.fft.rfft`, power |X|²;
  - the mel filterbank: `librosa.filters.mel` (Slaney scale and area normalisation), computed
    once on the host per (sample rate, n_fft, n_mels, fmin, fmax) and baked into the program as
    a constant (`mel_filterbank`); librosa is imported only there (the `audio` extra);
  - log10 with values more than 8 decades below the clip's maximum raised to that floor, then
    (x + 4) / 4, so speech-level inputs sit near [-1, 1].
`mel_power` is the spectrogram before the log: it equals `librosa.feature.melspectrogram` with
its defaults (centred, zero-padded, power 2) and the same n_fft / hop / mel settings.

Encoder: two 1-D convolutions over time (kernel 3, stride 2, padding 1, GELU; each one matmul
over the three stacked taps) → `tokens_per_clip` frames of `hidden_size`, plus a learned
position embedding; `num_layers` pre-LayerNorm layers (bidirectional multi-head attention with
biases, GELU MLP); a final LayerNorm. `AudioProjector` maps the features to the text width (one
bias-free linear, as the vision projector).

Parameters carry the text model's logical axis names (`embed`, `heads`, `head_dim`, `mlp`,
`norm`) so the one rules table shards them; the conv taps, mel bands and audio positions have
names of their own that the table leaves replicated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import AudioConfig
from .layers import param, plain_dot, rows_dot
from .vision import EncoderLayer, LayerNorm, dense


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """float32 [n_mels, n_fft // 2 + 1]: librosa's Slaney mel filterbank (a host constant)."""
    import librosa  # the `audio` extra; only models with an audio encoder need it

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)


def hann_window(n_fft: int) -> np.ndarray:
    """The periodic Hann window (scipy's `get_window("hann", n, fftbins=True)`, librosa's STFT default)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def mel_power(waves_NxS: jax.Array, cfg: AudioConfig) -> jax.Array:
    """Mel power spectrogram [N, frames, n_mels] (float32) of waveforms [N, S] (module doc)."""
    n_fft, hop = cfg.n_fft, cfg.hop_length
    x = jnp.pad(waves_NxS.astype(jnp.float32), ((0, 0), (n_fft // 2, n_fft // 2)))
    frames = 1 + (x.shape[1] - n_fft) // hop
    idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    spec = jnp.fft.rfft(x[:, idx] * hann_window(n_fft), axis=-1)
    power_NxFxK = jnp.square(spec.real) + jnp.square(spec.imag)
    fb = mel_filterbank(cfg.sample_rate, n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
    return jnp.einsum("nfk,mk->nfm", power_NxFxK, fb, precision=jax.lax.Precision.HIGHEST)


def log_mel(waves_NxS: jax.Array, cfg: AudioConfig) -> jax.Array:
    """The encoder's input [N, frames, n_mels]: log10 mel power, floored 8 decades below each
    clip's maximum, as (x + 4) / 4."""
    lm = jnp.log10(jnp.maximum(mel_power(waves_NxS, cfg), 1e-10))
    lm = jnp.maximum(lm, jnp.max(lm, axis=(1, 2), keepdims=True) - 8.0)
    return (lm + 4.0) / 4.0


def conv_taps(x_NxTxC: jax.Array) -> jax.Array:
    """[N, T, C] → [N, ceil(T / 2), 3, C]: the three inputs of each output of a kernel-3,
    stride-2 convolution with one zero of padding at each end."""
    T = x_NxTxC.shape[1]
    out = (T - 1) // 2 + 1
    xp = jnp.pad(x_NxTxC, ((0, 0), (1, 1), (0, 0)))
    idx = np.arange(out)[:, None] * 2 + np.arange(3)[None, :]
    return xp[:, idx]


class Conv(nnx.Module):
    """Kernel-3, stride-2 1-D convolution with bias, run as one matmul over the stacked taps."""

    def __init__(self, c_in: int, c_out: int, in_axis: str, *, param_dtype, std: float, rngs: nnx.Rngs):
        self.w = param(rngs, (3, c_in, c_out), ("conv_taps", in_axis, "embed"), param_dtype, std=std)
        self.b = param(rngs, (c_out,), ("norm",), param_dtype, init="zeros")

    def __call__(self, x_NxTxC):
        y = rows_dot(plain_dot(), conv_taps(x_NxTxC), self.w[...], 2)
        return y + self.b[...].astype(y.dtype)


class AudioEncoder(nnx.Module):
    """Waveforms [N, clip_samples] → audio features [N, tokens_per_clip, hidden_size]."""

    def __init__(self, cfg: AudioConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        D, pd, std = cfg.hidden_size, param_dtype, cfg.initializer_range
        self.conv1 = Conv(cfg.n_mels, D, "mel", param_dtype=pd, std=(3 * cfg.n_mels) ** -0.5, rngs=rngs)
        self.conv2 = Conv(D, D, "embed", param_dtype=pd, std=(3 * D) ** -0.5, rngs=rngs)
        self.position = param(rngs, (cfg.tokens_per_clip, D), ("audio_tokens", "embed"), pd, std=std)
        self.layers = nnx.List([EncoderLayer(cfg, param_dtype=pd, rngs=rngs, key_bias=False)
                                for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(D, cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)

    def __call__(self, waves_NxS: jax.Array) -> jax.Array:
        cfg = self.cfg
        if waves_NxS.ndim != 2 or waves_NxS.shape[1] != cfg.clip_samples:
            raise ValueError(f"audio clips are {tuple(waves_NxS.shape[1:])} samples, the audio encoder takes "
                             f"({cfg.clip_samples},) (pad shorter clips with silence)")
        x = log_mel(waves_NxS, cfg).astype(self.dtype)
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        x = x + self.position[...].astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)


class AudioProjector(nnx.Module):
    """One bias-free linear, audio hidden_size → text hidden size."""

    def __init__(self, cfg: AudioConfig, text_hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.w = param(rngs, (cfg.hidden_size, text_hidden), ("mlp", "embed"), param_dtype,
                       std=cfg.initializer_range)

    def __call__(self, feats):
        return dense(feats, self.w[...])

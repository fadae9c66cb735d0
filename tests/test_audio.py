"""Audio: the log-mel front end (vs librosa), fusion of the encoder's features, the audio_text
source kind and its bad inputs, and `llama4-jax train` with audio (model/audio.py,
model/multimodal.py, data/audio.py, data/audio_text.py, data/pipeline.py, data/tones.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

librosa = pytest.importorskip("librosa")
soundfile = pytest.importorskip("soundfile")

from flax import nnx  # noqa: E402

from llama4_jax.cli import main  # noqa: E402
from llama4_jax.data.audio import AUDIO, ClipConfig  # noqa: E402
from llama4_jax.data.audio_text import load_audio_documents  # noqa: E402
from llama4_jax.data.pipeline import build_mixture  # noqa: E402
from llama4_jax.data.sources import Source  # noqa: E402
from llama4_jax.data.tokenizer import make_tokenizer  # noqa: E402
from llama4_jax.data.tones import DTMF, tone_clip, write_tones  # noqa: E402
from llama4_jax.errors import DataError  # noqa: E402
from llama4_jax.model.audio import log_mel, mel_power  # noqa: E402
from llama4_jax.model.config import AudioConfig, ModelConfig, MoEConfig  # noqa: E402
from llama4_jax.model.multimodal import Llama4Multimodal, text_loss_mask  # noqa: E402
from llama4_jax.model.transformer import Llama4  # noqa: E402
from llama4_jax.train.optimizer import tower_of  # noqa: E402

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "audio_tiny.yaml"
CLIP = ClipConfig(sample_rate=8000, clip_samples=6144, tokens_per_clip=7)  # audio_tiny's encoder
AUDIO_ID, BOA, EOA = 267, 265, 266  # the byte_mm tokenizer's


@pytest.fixture(scope="module")
def tones(tmp_path_factory) -> Path:
    return write_tones(tmp_path_factory.mktemp("tones"), 40, seed=1)


def _signal(sr: int, seconds: float) -> np.ndarray:
    """A DTMF sequence, then a chirp sweeping the band, under faint noise: energy in many bands."""
    rng = np.random.default_rng(0)
    tones = tone_clip(rng, "1590", sample_rate=sr)
    t = np.arange(int(sr * seconds) - len(tones)) / sr
    chirp = 0.3 * np.sin(2 * np.pi * (100 * t + 0.5 * (0.4 * sr - 100) / t[-1] * t ** 2))
    return (np.concatenate([tones, chirp]) + rng.normal(0, 0.01, int(sr * seconds))).astype(np.float32)


@pytest.mark.parametrize("cfg", [
    AudioConfig(sample_rate=8000, clip_samples=6144, n_fft=512, hop_length=256, n_mels=40),  # audio_tiny
    AudioConfig(sample_rate=16000, clip_samples=16000, n_fft=400, hop_length=160, n_mels=80, fmin=20.0,
                fmax=7600.0),  # speech-like, with a band
], ids=["tiny", "speech"])
def test_mel_front_end_matches_librosa(cfg):
    """Reference: librosa.feature.melspectrogram (its own STFT: centred, zero padding, periodic
    Hann, power 2) on a tone + chirp + noise signal. Tolerance: float32 FFTs of a few hundred
    points agree to ~1e-5 relative; 1e-4 of each value plus 1e-6 of the largest covers them.
    The log and its 8-decade floor are then checked against numpy on librosa's values."""
    wave = _signal(cfg.sample_rate, cfg.clip_samples / cfg.sample_rate)
    ref = librosa.feature.melspectrogram(y=wave, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                         n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax).T  # [frames, n_mels]
    ours, ours_log = jax.jit(lambda w: (mel_power(w, cfg)[0], log_mel(w, cfg)[0]))(jnp.asarray(wave[None]))
    assert ours.shape == ref.shape == (cfg.num_frames, cfg.n_mels)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-6 * ref.max())
    lm = np.log10(np.maximum(ref, 1e-10))
    lm = (np.maximum(lm, lm.max() - 8.0) + 4.0) / 4.0
    np.testing.assert_allclose(np.asarray(ours_log), lm, atol=1e-4)


def _tiny_audio_model_config() -> ModelConfig:
    audio = AudioConfig(sample_rate=8000, clip_samples=2048, n_fft=256, hop_length=128, n_mels=16,
                        hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    return ModelConfig(vocab_size=272, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                       dense_ff=32, moe=MoEConfig(num_experts=2, top_k=1, expert_ff=16), interleave_moe_layer_step=0,
                       attention_chunk_size=None, max_position_embeddings=64, audio=audio)


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: Llama4Multimodal(_tiny_audio_model_config(), rngs=nnx.Rngs(0)))()


def test_fusion_places_clip_features_at_their_placeholders(model):
    """Reference: each clip's features computed alone (audio_embeds of one clip), written by hand
    into the token embeddings at that clip's placeholders; checked for the flat layout, the
    per-row layout and the packed layout (a row beginning in the middle of a clip). One jitted
    program computes everything (eager op-by-op dispatch is slow on CPU)."""
    T = model.cfg.audio.tokens_per_clip
    assert T == 5  # 2048 samples / hop 128 → 17 frames → 9 → 5
    rng = np.random.default_rng(0)
    clips = rng.normal(0, 0.3, (3, 2048)).astype(np.float32)
    prompt = [BOA] + [AUDIO_ID] * T + [EOA]
    row0 = [49] + prompt + [50, 51] + prompt + [52]  # clips 0 and 1
    row1 = [53, 54] + prompt + [55] * 9  # clip 2
    ids = np.array([row0, row1], np.int32)
    per_row_clips = np.stack([clips[:2], np.stack([clips[2], np.zeros(2048, np.float32)])])
    # Packed: a row that begins with the last 3 placeholders of clip 1 (its features 2..4).
    cut = np.array([[AUDIO_ID] * 3 + [EOA, 56]], np.int32)
    index = np.array([[2, 3, 4, -1, -1]], np.int32)

    @nnx.jit
    def run(m, ids, clips, per_row_clips, cut, index):
        alone = [m.audio_embeds(clips[c:c + 1]) for c in range(3)]  # each [T, D]
        return (alone, m.embed_tokens(ids), m.embed_tokens(cut), m.fused_embeds(ids, audio_values=clips),
                m.fused_embeds(ids, audio_values=per_row_clips),
                m.fused_embeds(cut, audio_values=clips[None, 1:2], audio_index_BxL=index))

    feats, ref, want, flat, per_row, packed = jax.tree.map(np.array, run(model, ids, clips, per_row_clips, cut, index))
    for r, own in ((0, [0, 1]), (1, [2])):
        ref[r, ids[r] == AUDIO_ID] = np.concatenate([feats[c] for c in own])
    np.testing.assert_allclose(flat, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_row, ref, rtol=1e-5, atol=1e-6)
    want[0, :3] = feats[1][2:]
    np.testing.assert_allclose(packed, want, rtol=1e-5, atol=1e-6)


def test_image_and_audio_in_one_row_each_go_to_their_placeholders():
    """A model with both towers, one packed row holding an image and a clip (per-row layout with
    both indices, as the trainer feeds a mixed batch): every `<|patch|>` takes its tile's
    feature, every `<|audio|>` its clip's, computed alone by each tower; text keeps its
    embedding. Reference: the features written by hand into the token embeddings."""
    from llama4_jax.model.config import VisionConfig

    vision = VisionConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=64, image_size=16,
                          patch_size=8, projector_input_dim=16, projector_output_dim=16, vision_output_dim=16,
                          image_token_id=262, boi_token_id=259, eoi_token_id=260)
    cfg = _tiny_audio_model_config().replace(vision=vision)
    m = Llama4Multimodal(cfg, rngs=nnx.Rngs(1))
    Ti, Ta = vision.tokens_per_tile, cfg.audio.tokens_per_clip
    ids = np.array([[49, 259] + [262] * Ti + [260, 50, BOA] + [AUDIO_ID] * Ta + [EOA, 51]], np.int32)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(1, 1, 3, 16, 16)).astype(np.float32)
    clips = rng.normal(0, 0.3, (1, 1, 2048)).astype(np.float32)
    image_index = np.where(ids == 262, np.cumsum(ids == 262, axis=1) - 1, -1).astype(np.int32)
    audio_index = np.where(ids == AUDIO_ID, np.cumsum(ids == AUDIO_ID, axis=1) - 1, -1).astype(np.int32)

    @nnx.jit
    def run(m, ids, pixels, clips, image_index, audio_index):
        return (m.embed_tokens(ids), m.image_embeds(pixels[0]), m.audio_embeds(clips[0]),
                m.fused_embeds(ids, pixels, image_index, clips, audio_index))

    want, image, audio, fused = jax.tree.map(np.array, run(m, ids, pixels, clips, image_index, audio_index))
    want[0, ids[0] == 262] = image
    want[0, ids[0] == AUDIO_ID] = audio
    np.testing.assert_allclose(fused, want, rtol=1e-5, atol=1e-6)


def test_text_only_batch_is_the_text_model(model):
    """Without audio_values the multimodal model computes the logits of the text model holding
    the same text variables bit for bit, and traces the same program: no FFT, the same number of
    equations."""
    cfg = model.cfg
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama4(cfg.replace(audio=None), rngs=nnx.Rngs(0))))
    mine = dict(nnx.to_flat_state(nnx.state(model)))
    for path, v in nnx.to_flat_state(state):
        v.set_value(mine[path].get_value())
    text = nnx.merge(graphdef, state)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 12)), jnp.int32)
    got, want = nnx.jit(lambda m, t, x: (m(x), t(x)))(model, text, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    jaxpr_mm = str(jax.make_jaxpr(lambda x: model(x))(ids))
    jaxpr_text = str(jax.make_jaxpr(lambda x: text(x))(ids))
    assert "fft" not in jaxpr_mm and jaxpr_mm.count("\n") == jaxpr_text.count("\n")
    # the loss mask drops the audio span (audio_start's target through audio_end) and nothing else
    inputs = jnp.asarray([[49, BOA, AUDIO_ID, AUDIO_ID, EOA, 50, 51]], jnp.int32)
    targets = jnp.asarray([[BOA, AUDIO_ID, AUDIO_ID, EOA, 50, 51, 52]], jnp.int32)
    mask = text_loss_mask(inputs, targets, jnp.ones((1, 7)), cfg)
    np.testing.assert_array_equal(np.asarray(mask), [[0, 0, 0, 0, 1, 1, 1]])


def test_towers_of_the_audio_parameters(model):
    towers = {tower_of(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    assert towers == {"text", "audio", "audio_projector"}


def _sources(tones: Path, eval_fraction=0.3) -> dict[str, Source]:
    return {"tones": Source(kind="audio_text", path=str(tones / "transcripts.jsonl"), eval_fraction=eval_fraction),
            "txt": Source(kind="jsonl", path=str(tones / "transcripts_text.jsonl"), eval_fraction=0.0)}


def test_rows_carry_each_clip_at_its_placeholders(tones):
    """Reference: the held-out documents tokenized one by one; the k-th placeholder of that
    stream is feature k % T of clip k // T. Train rows: every audio row's placeholders get a
    feature of a clip it carries, and audio targets carry no loss."""
    tok = make_tokenizer("byte_mm")
    _, held_out = load_audio_documents("tones", _sources(tones)["tones"], CLIP)
    stream = np.concatenate([tok.encode(t) + [tok.eos_id] for t in held_out.texts])
    k_of = np.cumsum(stream == AUDIO_ID) - 1
    it = build_mixture(_sources(tones), tok, seed=3, seq_len=24, global_batch=4, audio_config=CLIP, prefetch=0)
    T, L, seen = CLIP.tokens_per_clip, 24, 0
    for b, batch in enumerate(it.eval_batches("tones", seq_len=L, global_batch=4)):
        assert "pixel_values" not in batch and batch["audio_values"].shape[2:] == (6144,)
        for r in range(4):
            lo = (b * 4 + r) * L
            for i in np.flatnonzero(batch["audio_index"][r] >= 0):
                k, j = k_of[lo + i], batch["audio_index"][r, i]
                assert j % T == k % T
                np.testing.assert_array_equal(batch["audio_values"][r, j // T], held_out.clips[k // T])
                seen += 1
            np.testing.assert_array_equal(batch["audio_index"][r] >= 0, batch["inputs"][r] == AUDIO_ID)
    assert seen == (stream == AUDIO_ID).sum() > 0
    kinds = set()
    for _ in range(10):
        batch = next(it)
        kinds.add("audio_values" in batch)
        assert not (np.isin(batch["targets"], [BOA, EOA, AUDIO_ID]) & (batch["loss_mask"] > 0)).any() or \
            "audio_values" not in batch
        if "audio_values" in batch:
            text_rows = batch["source_ids"] == 1
            assert (batch["audio_index"][text_rows] == -1).all() and not batch["audio_values"][text_rows].any()
    assert kinds == {True, False} or kinds == {True}


def test_a_batch_mixes_image_audio_and_text_rows(tones, tmp_path):
    """Image, audio and text sources in one mixture: each row carries only its own modality's
    items (the others' fields are blank: zeros, index -1), every placeholder of a media row has a
    feature, and a text row's stray `<|audio|>` tokens get none."""
    from llama4_jax.data.images import ImageConfig
    from llama4_jax.data.shapes import write_shapes

    shapes = write_shapes(tmp_path / "shapes", 12, seed=0)
    sources = {"img": Source(kind="image_text", path=str(shapes / "captions.jsonl"), eval_fraction=0.0),
               "tones": Source(kind="audio_text", path=str(tones / "transcripts.jsonl"), eval_fraction=0.0),
               "txt": Source(kind="jsonl", path=str(tones / "transcripts_text.jsonl"), eval_fraction=0.0)}
    it = build_mixture(sources, make_tokenizer("byte_mm"), seed=0, seq_len=24, global_batch=6, prefetch=0,
                       image_config=ImageConfig(tile_size=32, max_patches=1, patch_size=8), audio_config=CLIP)
    both = 0
    for _ in range(12):
        batch = next(it)
        both += {"pixel_values", "audio_values"} <= set(batch)
        for values, index, placeholder, own in (("pixel_values", "image_index", 262, 0),
                                                ("audio_values", "audio_index", AUDIO_ID, 1)):
            if values not in batch:
                assert not (batch["source_ids"] == own).any()
                continue
            for r, src in enumerate(batch["source_ids"]):
                if src == own:
                    np.testing.assert_array_equal(batch[index][r] >= 0, batch["inputs"][r] == placeholder)
                else:
                    assert (batch[index][r] == -1).all() and not batch[values][r].any()
    assert both >= 1


def _bad(tones: Path, rows: list[dict]) -> Path:
    path = tones / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bad_clips(tones) -> Path:
    soundfile.write(tones / "at16k.wav", tone_clip(np.random.default_rng(0), "12", sample_rate=16000), 16000)
    (tones / "garbage.wav").write_bytes(b"RIFF\x00\x00not a wave file at all")
    soundfile.write(tones / "long.wav", np.zeros(7000, np.float32), 8000)
    return tones


@pytest.mark.parametrize("rows, message", [
    ([{"text": "<|audio|>1", "audio": "clips/0.wav"}, {"text": "<|audio|>12", "audio": ["at16k.wav"]}],
     r"bad\.jsonl:2: audio .*at16k\.wav is sampled at 16000 Hz, the audio encoder takes 8000 Hz"),
    ([{"text": "<|audio|>1", "audio": ["garbage.wav"]}], r"bad\.jsonl:1: cannot read audio .*garbage\.wav"),
    ([{"text": "<|audio|>1", "audio": ["missing.wav"]}], r"bad\.jsonl:1: cannot read audio .*missing\.wav"),
    ([{"text": "<|audio|><|audio|>1", "audio": ["clips/0.wav"]}], r"bad\.jsonl:1: 2 <\|audio\|> markers for 1 audio clips"),
    ([{"text": "1", "audio": ["clips/0.wav"]}], r"bad\.jsonl:1: 0 <\|audio\|> markers for 1 audio clips"),
    ([{"text": "<|audio|>1", "audio": ["long.wav"]}], r"bad\.jsonl:1: audio .*long\.wav is 0\.875 s, longer than"),
])
def test_bad_rows_name_file_and_row(bad_clips, rows, message):
    with pytest.raises(DataError, match=message):
        build_mixture({"bad": Source(kind="audio_text", path=str(_bad(bad_clips, rows)))}, make_tokenizer("byte_mm"),
                      seed=0, seq_len=16, global_batch=2, audio_config=CLIP, prefetch=0)


def test_resampling_on_reads_other_rates(bad_clips):
    """With resample on, the 16 kHz clip is read at 8 kHz: its DTMF pair is where the 8 kHz
    clip of the same digits has it (librosa.resample; the reference is the tone generator)."""
    path = _bad(bad_clips, [{"text": "<|audio|>12", "audio": ["at16k.wav"]}])
    cfg = ClipConfig(8000, 6144, 7, resample=True)
    train, _ = load_audio_documents("bad", Source(kind="audio_text", path=str(path), eval_fraction=0.0), cfg)
    wave = train.clips[0][:1024]  # the "1"
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(1024)))
    peaks = sorted(np.argsort(spectrum)[-2:] * 8000 / 1024)
    assert abs(peaks[0] - DTMF["1"][0]) < 16 and abs(peaks[1] - DTMF["1"][1]) < 16


def test_audio_source_needs_audio_tokens(tones):
    with pytest.raises(DataError, match="does not encode .* as single tokens"):
        build_mixture(_sources(tones), make_tokenizer("byte_image"), seed=0, seq_len=16, global_batch=2,
                      audio_config=CLIP, prefetch=0)


def _experiment(tmp_path: Path, data: Path, **edits) -> Path:
    raw = yaml.safe_load(EXPERIMENT.read_text())
    raw["model"]["overrides"].update(num_layers=1, hidden_size=32, dense_ff=64)
    raw["audio"]["encoder"].update(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, n_mels=16)
    raw["data"]["sources"]["tones"].update(path=str(data), eval_fraction=0.3)
    raw["data"]["prefetch"] = 0
    raw["curriculum"]["stages"] = [
        {"name": "encoder_frozen", "steps": 1, "seq_len": 32, "batch_size": 4, "mixture": {"tones": 1.0},
         "trainable": ["text", "audio_projector"]},
        {"name": "all", "steps": 2, "seq_len": 32, "batch_size": 4, "mixture": {"tones": 1.0}}]
    raw.update(checkpoint={"every_steps": 100, "keep_last": 1, "async_save": False},
               logging={"every_steps": 1, "tensorboard": False, "progress": False}, eval={"every_steps": 3, "batches": 1})
    for key, value in edits.items():
        raw[key] = value
    exp = tmp_path / "audio.yaml"
    exp.write_text(yaml.safe_dump(raw))
    return exp


def test_train_cli_runs_with_audio(tones, tmp_path):
    """`llama4-jax train` on the audio_tiny experiment cut to 3 steps of the smallest shapes (the
    encoder frozen in stage 1): it finishes with a finite transcript loss and evaluates."""
    exp = _experiment(tmp_path, tones / "transcripts.jsonl")
    assert main(["train", str(exp), "--workdir", str(tmp_path / "run")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss/tones"]) for r in rows)
    assert np.isfinite(rows[-1]["eval/loss/tones"])


def test_cli_bad_sample_rate_is_one_line_exit_2(bad_clips, tmp_path, capsys):
    data = _bad(bad_clips, [{"text": "<|audio|>1", "audio": "clips/0.wav"}, {"text": "<|audio|>12", "audio": "at16k.wav"}])
    exp = _experiment(tmp_path, data)
    assert main(["train", str(exp), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:2: audio" in err and "16000 Hz" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit, where", [
    (lambda raw: raw.pop("audio"), "data.sources.tones.kind"),
    (lambda raw: raw["audio"]["encoder"].update(num_heads=5), "audio.encoder"),
    (lambda raw: raw["curriculum"]["stages"][0].update(trainable=["vision"]), "curriculum.stages[0].trainable"),
    (lambda raw: raw["model"]["overrides"].update(audio={"hidden_size": 8}), "model.overrides.audio"),
])
def test_audio_config_errors_name_the_key(tmp_path, edit, where):
    from llama4_jax.config import load_experiment
    from llama4_jax.errors import ConfigError

    raw = yaml.safe_load(EXPERIMENT.read_text())
    raw["data"]["sources"]["tones"]["path"] = str(tmp_path / "t.jsonl")
    edit(raw)
    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_experiment(exp)
    assert where in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_tones_are_deterministic_and_spell_their_transcripts(tmp_path, tones):
    again = write_tones(tmp_path / "again", 40, seed=1)
    assert (again / "transcripts.jsonl").read_bytes() == (tones / "transcripts.jsonl").read_bytes()
    assert (again / "clips" / "7.wav").read_bytes() == (tones / "clips" / "7.wav").read_bytes()
    row = json.loads((tones / "transcripts.jsonl").read_text().splitlines()[7])
    digits = row["text"].removeprefix(AUDIO)
    wave, sr = soundfile.read(tones / row["audio"][0], dtype="float32")
    assert sr == 8000 and len(wave) == 1024 * len(digits) and 3 <= len(digits) <= 6
    for k, d in enumerate(digits):  # each 0.128 s holds its digit's DTMF pair
        spectrum = np.abs(np.fft.rfft(wave[k * 1024:(k + 1) * 1024] * np.hanning(1024)))
        peaks = sorted(np.argsort(spectrum)[-2:] * 8000 / 1024)
        assert abs(peaks[0] - DTMF[d][0]) < 16 and abs(peaks[1] - DTMF[d][1]) < 16, (d, peaks)

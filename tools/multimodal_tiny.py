"""Does early fusion learn to use the image? Caption loss of a tiny multimodal Llama 4 versus
the same text model trained on the same rows without pixels.

    PYTHONPATH=. python tools/multimodal_tiny.py [--steps 2000] [--batch 32] [--lr 1e-2]

Synthetic data made here: 32×32 images of one shape (square, circle, cross) in one colour (red,
green, blue, yellow) in one quadrant, captioned "<colour> <shape> <quadrant>." (48 captions,
log 48 = 3.87 nats of information per caption, all of it in the image). Each row is Llama 4's
prompt for a one-tile image (data/images.py: <|image_start|><|image|><|patch|>×4<|image_end|>)
followed by the caption in bytes; the loss covers only the caption (model/multimodal.py
`text_loss_mask` drops the image span). Both runs use the project's train step
(train/step.py) with AdamW; the caption loss is then measured on 512 fresh images. A model that
reads the image approaches the caption's spelling entropy (≈0); one that cannot pays ≈ log 48
spread over the caption's words.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llama4_jax.data.images import IMAGE, IMAGE_END, IMAGE_START, PATCH, ImageConfig, image_prompt, normalize
from llama4_jax.model.config import ModelConfig, MoEConfig, VisionConfig
from llama4_jax.model.multimodal import text_loss_mask
from llama4_jax.train.state import init_state
from llama4_jax.train.step import StepConfig, make_eval_step, make_train_step

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 230), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle", "cross")
PLACES = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
SPECIAL = {IMAGE_START: 256, IMAGE_END: 257, IMAGE: 258, PATCH: 259, "<eos>": 260}
VOCAB, L, S = 264, 40, 32


def draw(rng, colour, shape, place) -> np.ndarray:
    img = rng.integers(0, 40, (S, S, 3)).astype(np.uint8)
    (qy, qx), c = PLACES[place], np.asarray(COLOURS[colour], np.uint8)
    cy, cx = qy * 16 + 8 + rng.integers(-2, 3), qx * 16 + 8 + rng.integers(-2, 3)
    yy, xx = np.mgrid[:S, :S]
    dy, dx = yy - cy, xx - cx
    r = rng.integers(4, 7)
    mask = {"square": (abs(dy) <= r) & (abs(dx) <= r), "circle": dy ** 2 + dx ** 2 <= r * r,
            "cross": ((abs(dy) <= 1) & (abs(dx) <= r)) | ((abs(dx) <= 1) & (abs(dy) <= r))}[shape]
    img[mask] = c
    return img


def encode(text: str) -> list[int]:
    out, i = [], 0
    while i < len(text):
        for tok, tid in SPECIAL.items():
            if text.startswith(tok, i):
                out.append(tid)
                i += len(tok)
                break
        else:
            out += list(text[i].encode())
            i += 1
    return out


def batch(rng, n: int, icfg: ImageConfig, vcfg: ModelConfig):
    rows, pix = [], []
    for _ in range(n):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        img = draw(rng, colour, shape, place)
        pix.append(normalize(img, icfg.mean, icfg.std)[None])  # one tile (the image is one tile)
        ids = encode(image_prompt((1, 1), icfg.tokens_per_tile) + f"{colour} {shape} {place}.") + [SPECIAL["<eos>"]]
        rows.append(ids + [SPECIAL["<eos>"]] * (L + 1 - len(ids)))
    ids = np.asarray(rows, np.int32)
    inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
    real = jnp.asarray((np.cumsum(ids[:, :-1] == SPECIAL["<eos>"], axis=1) == 0).astype(np.float32))
    mask = text_loss_mask(inputs, targets, real, vcfg)
    return {"inputs": inputs, "targets": targets, "segment_ids": jnp.zeros_like(inputs),
            "positions": jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), inputs.shape), "loss_mask": mask,
            "source_ids": jnp.zeros(n, jnp.int32), "pixel_values": jnp.asarray(np.stack(pix))}


def run(cfg: ModelConfig, data_cfg: ModelConfig, with_images: bool, steps: int, n: int, seed: int, lr: float):
    icfg = ImageConfig(tile_size=S, max_patches=1, patch_size=8)
    graphdef, state, tx = init_state(cfg, seed, lambda p: optax.adamw(optax.warmup_cosine_decay_schedule(
        0, lr, 20, steps, lr / 10), weight_decay=0.01))
    step = jax.jit(make_train_step(graphdef, tx, StepConfig(num_sources=1)), donate_argnums=0)
    evaluate = jax.jit(make_eval_step(graphdef))
    drop = (lambda b: b) if with_images else (lambda b: {k: v for k, v in b.items() if k != "pixel_values"})
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for i in range(steps):
        state, m = step(state, drop(batch(rng, n, icfg, data_cfg)))
        if i % 50 == 0 or i == steps - 1:
            print(f"  {'images' if with_images else 'text-only'} step {i}: loss {float(m['loss']):.3f}", flush=True)
    train_s = time.time() - t0
    test_rng = np.random.default_rng(10_000)
    tot = toks = 0.0
    for _ in range(512 // n):
        s, t = evaluate(state, drop(batch(test_rng, n, icfg, data_cfg)))
        tot, toks = tot + float(s), toks + float(t)
    return tot / toks, train_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    vision = VisionConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, image_size=S,
                          patch_size=8, projector_input_dim=64, projector_output_dim=64, vision_output_dim=64,
                          image_token_id=SPECIAL[PATCH], boi_token_id=SPECIAL[IMAGE_START],
                          eoi_token_id=SPECIAL[IMAGE_END])
    text = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                       dense_ff=128, moe=MoEConfig(num_experts=4, top_k=1, expert_ff=64), interleave_moe_layer_step=2,
                       attention_chunk_size=None, max_position_embeddings=64)
    mm = text.replace(vision=vision)
    print(f"devices: {jax.devices()}")
    with_img, t1 = run(mm, mm, True, args.steps, args.batch, args.seed, args.lr)
    without, t2 = run(text, mm, False, args.steps, args.batch, args.seed, args.lr)
    print(f"caption loss on 512 held-out images after {args.steps} steps of {args.batch}: "
          f"with images {with_img:.3f} nats/token ({t1:.0f} s), text-only {without:.3f} ({t2:.0f} s), "
          f"ratio {without / with_img:.1f}x")


if __name__ == "__main__":
    main()

"""Record HF's Llama4Processor output on tests/llama4_processor_cases.py into
tests/data/llama4_processor/ref.npz (the reference tests/test_images.py compares against).

    python tools/make_llama4_processor_ref.py [--torchvision-dir DIR]

Needs transformers 5.x and torchvision 0.28 (HF's Llama4ImageProcessor is torchvision-only). The
PyPI torchvision wheel is built for CUDA torch; with a CPU-only torch its C extension does not
load and `import torchvision` fails registering fake kernels for two detection ops (nms, qnms)
that nothing here uses. `--torchvision-dir` (a `pip install --no-deps --target DIR
torchvision==0.28.*`, kept out of the environment so nothing else imports it) declares those two
op schemas first; the resize / pad / normalize functions HF calls are pure torch either way.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import llama4_processor_cases as cases  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--torchvision-dir")
    ap.add_argument("--out", default=str(ROOT / "tests/data/llama4_processor/ref.npz"))
    args = ap.parse_args()
    import torch

    if args.torchvision_dir:
        sys.path.insert(0, args.torchvision_dir)
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841  (kept alive until exit)
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
    import transformers
    from transformers import Llama4ImageProcessor, Llama4Processor, PreTrainedTokenizerFast

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases.build_tokenizer(Path(tmp) / "tokenizer.json")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"))
        imgs = cases.images()
        for mp in cases.MAX_PATCHES:
            ip = Llama4ImageProcessor(size={"height": cases.TILE, "width": cases.TILE}, max_patches=mp)
            for i, img in enumerate(imgs):  # each image alone: its tiles and canvas
                r = ip(img, return_tensors="pt")
                out[f"pixels/{mp}/{i}"] = r["pixel_values"].to(torch.bfloat16).view(torch.int16).numpy()
                out[f"aspect/{mp}/{i}"] = r["aspect_ratios"].numpy()
            proc = Llama4Processor(image_processor=ip, tokenizer=tok, patch_size=cases.PATCH)
            r = proc(images=imgs[:sum(p.count("<|image|>") for p in cases.PROMPTS)], text=list(cases.PROMPTS))
            for j, ids in enumerate(r["input_ids"]):
                out[f"ids/{mp}/{j}"] = np.asarray(ids, np.int32)
            pv = r["pixel_values"]  # one [tiles, C, S, S] tensor per image
            pv = torch.cat(list(pv)) if isinstance(pv, (list, tuple)) else pv
            out[f"batch_pixels/{mp}"] = pv.to(torch.bfloat16).view(torch.int16).numpy()
    out["versions"] = np.asarray([transformers.__version__, torchvision.__version__, torch.__version__])
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {len(out)} arrays (transformers {transformers.__version__}, "
          f"torchvision {torchvision.__version__})")


if __name__ == "__main__":
    main()

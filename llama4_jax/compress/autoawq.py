"""A quantized model → a Hugging Face directory in AutoAWQ's "gemm" layout (docs/compress.md
describes every field). Our in-memory layout already is AutoAWQ's, so the packed tensors are
copied bit for bit (uint32 viewed as int32).

Per quantized linear `<module>` (HF module names: `model.layers.{i}.self_attn.q_proj`, ...):
  - `<module>.qweight` int32 [in, out/8]: eight 4-bit codes per int32 along the output axis,
    nibble i (bits 4i..4i+3) holding output column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i];
  - `<module>.qzeros` int32 [in/group, out/8]: zero points, packed the same way;
  - `<module>.scales` float16 [in/group, out];
  w[in=k, out=n] = (code[k, n] − zero[k // group, n]) · scale[k // group, n].
Routed experts, which HF Llama 4 stores fused (`experts.gate_up_proj`), are written per expert
as `feed_forward.experts.{e}.{gate,up,down}_proj`, plus `feed_forward.experts.{e}.input_scales`
float32 [hidden]: AWQ's per-expert input scale, by which that expert's input is divided before
gate_proj and up_proj (AutoAWQ's ScaledActivation idea; ones after RTN). Router, norms,
embeddings (and the head unless quantized) are float16 `.weight` tensors under their usual
names. config.json is the model's HF config with `quantization_config` {quant_method: "awq",
bits, group_size, zero_point: true, version: "gemm", modules_to_not_convert}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..convert.hf import config_to_hf, ours_to_hf, tensor_map
from ..model.config import ModelConfig
from ..model.quant import QuantSpec
from ..model.special_tokens import SpecialTokens

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


def _hf_module(name: str) -> list[tuple[str, int | None]]:
    """Our quantized weight's flat name → [(HF module name, expert index or None)]."""
    if name == "lm_head":
        return [("lm_head", None)]
    parts = name.split(".")
    layer, rest = int(parts[2]), parts[3:]
    p = f"model.layers.{layer}."
    if rest[0] == "attn":
        return [(p + "self_attn." + _ATTN[rest[1]], None)]
    if rest[1] == "experts":
        return [("experts", None)]  # expanded per expert by the caller
    if rest[1] == "shared":
        return [(p + f"feed_forward.shared_expert.{rest[2]}_proj", None)]
    return [(p + f"feed_forward.{rest[1]}_proj", None)]


def autoawq_tensors(cfg: ModelConfig, qflat: dict, spec: QuantSpec) -> dict[str, np.ndarray]:
    """HF name → array of the AutoAWQ directory."""
    out: dict[str, np.ndarray] = {}
    i32 = lambda a: np.ascontiguousarray(np.asarray(a, np.uint32)).view(np.int32)
    for hf_name, path, conv, layer in tensor_map(cfg):
        ours = ".".join(path) if layer is None else f"groups.blocks.{layer}." + ".".join(path)
        if ours in qflat:  # float: the usual HF tensor, in float16
            if conv == "up":
                continue
            up = qflat[ours[: -len("gate")] + "up"] if conv == "gate" else None
            out[hf_name] = ours_to_hf(conv, np.asarray(qflat[ours]), None if up is None else np.asarray(up)).astype(np.float16)
            continue
        if conv == "up":
            continue
        if path[-2:] in (("experts", "gate"), ("experts", "down")):
            f = f"model.layers.{layer}.feed_forward.experts."
            for proj in (("gate", "up") if conv == "gate" else ("down",)):
                base = f"groups.blocks.{layer}.ffn.experts.{proj}"
                for e in range(cfg.moe.num_experts):
                    m = f"{f}{e}.{proj}_proj"
                    out[m + ".qweight"] = i32(qflat[base + ".qweight"][e])
                    out[m + ".qzeros"] = i32(qflat[base + ".qzeros"][e])
                    out[m + ".scales"] = np.asarray(qflat[base + ".scales"][e], np.float16)
                    if proj == "gate":
                        out[f"{f}{e}.input_scales"] = np.asarray(qflat[base + ".in_scale"][e], np.float32)
            continue
        (m, _), = _hf_module(ours)
        out[m + ".qweight"] = i32(qflat[ours + ".qweight"])
        out[m + ".qzeros"] = i32(qflat[ours + ".qzeros"])
        out[m + ".scales"] = np.asarray(qflat[ours + ".scales"], np.float16)
    return out


def write_autoawq(out_dir: Path, cfg: ModelConfig, qflat: dict, spec: QuantSpec,
                  tokens: SpecialTokens = SpecialTokens()) -> None:
    """config.json, generation_config.json and model.safetensors into `out_dir` (existing, empty)."""
    from safetensors.numpy import save_file

    if spec.bits != 4:
        raise ValueError("the AutoAWQ gemm layout stores 4-bit codes only")
    hf = config_to_hf(cfg, tokens)
    hf["torch_dtype"] = "float16"
    keep = ["router"] + ([] if spec.head else ["lm_head"])
    hf["quantization_config"] = {"quant_method": "awq", "bits": spec.bits, "group_size": spec.group_size,
                                 "zero_point": True, "version": "gemm", "modules_to_not_convert": keep}
    out_dir = Path(out_dir)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=1))
    (out_dir / "generation_config.json").write_text(json.dumps(tokens.hf_generation_config(), indent=1))
    save_file(autoawq_tensors(cfg, qflat, spec), str(out_dir / "model.safetensors"), metadata={"format": "pt"})

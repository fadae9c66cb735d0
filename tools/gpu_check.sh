#!/usr/bin/env bash
# GPU check for one H100/H200 (the device tool's machine): bf16 vs FP8 train-step time and MFU of
# the ~1B-parameter MoE in experiments/gpu_1b.yaml, plus the MoE block sweep (ragged_dot path, bf16).
# Installs nothing: the image has jax, flax, optax, orbax, rich, pyyaml, safetensors; the rest
# travels as wheels in .whl/ (carry it), built here with:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl grain tensorboardX pydantic pydantic-core annotated-types typing-inspection array-record
# (EXP=… STEPS=… override the experiment and step count, e.g. for a CPU smoke run.)
# Run:  device.run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Results: $OUT/bench_bf16.json, $OUT/bench_fp8.json, $OUT/moe_bf16.txt, $OUT/summary.txt
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/summary.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/summary.txt"
timeout 200 python3 -m llama4_jax bench "${EXP:-experiments/gpu_1b.yaml}" --steps "${STEPS:-8}" --warmup 3 --json \
  > "$OUT/bench_bf16.json" 2> "$OUT/bench_bf16.err"
timeout 200 python3 -m llama4_jax bench "${EXP:-experiments/gpu_1b.yaml}" --steps "${STEPS:-8}" --warmup 3 --json \
  --set precision.fp8.enabled=true > "$OUT/bench_fp8.json" 2> "$OUT/bench_fp8.err"
python3 - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
r = {k: json.loads((out / f"bench_{k}.json").read_text()) for k in ("bf16", "fp8")
     if (out / f"bench_{k}.json").stat().st_size}
for k, v in r.items():
    print(f"{k}: step {v['step_s']*1e3:.1f} ms, {v['tokens_per_s']:,.0f} tokens/s, MFU {v['mfu']*100:.1f}% "
          f"of {v['peak_flops']/1e12:.0f} TFLOP/s ({v['peak_flops_source']}), compile {v['compile_s']:.0f} s")
if len(r) == 2:
    print(f"fp8 step / bf16 step = {r['fp8']['step_s'] / r['bf16']['step_s']:.3f}  (goal <= 0.83)")
PY
timeout 120 python3 tools/bench_moe.py --no-contrast --dtype bfloat16 > "$OUT/moe_bf16.txt" 2>&1 || echo "bench_moe failed" >> "$OUT/summary.txt"

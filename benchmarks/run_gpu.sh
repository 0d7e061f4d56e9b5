#!/usr/bin/env bash
# The one script to run on the GPU machine (H100/H200), from the repository root:
#
#     OUT=/some/folder bash benchmarks/run_gpu.sh
#
# SD v1.5's architecture with random weights (benchmarks/sd15_random.py: nothing is downloaded), 512x512,
# 50 DDIM steps, float16, batch 1 and 4; plain vs layout-guided (defaults) vs modulation at every step,
# interleaved, 2 warm-up + 5 timed rounds each; then the one-layer microbenchmark (seconds). Expected about
# 3-4 minutes on an H100 (not yet run on one: the budget is ~8 minutes).
#
# Installs nothing from the network. If diffusers is missing, it is installed from wheels carried in ./wheels
# (pip install --no-index --find-links wheels diffusers). torch and transformers must already be there.
# Results: $OUT/bench_attention_sd15_fp16.json (every number) and .txt (the table), the same for
# bench_processor (one cross-attention layer per UNet level, seconds), and $OUT/environment.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"

export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DIFFUSERS_VERBOSITY=error

if ! "$PYTHON" -c "import diffusers" >/dev/null 2>&1; then
    if [ -d wheels ]; then
        echo "diffusers is missing: installing it from ./wheels (no network)" >&2
        "$PYTHON" -m pip install --no-index --find-links wheels diffusers
    else
        echo "diffusers is missing and there is no ./wheels folder to install it from" >&2
        exit 1
    fi
fi

{
    "$PYTHON" - <<'EOF'
import platform, torch, transformers, diffusers, realign_pipeline
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| diffusers", diffusers.__version__,
      "| realign_pipeline", realign_pipeline.__version__, realign_pipeline.__file__)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: this script is for the GPU machine")
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
    git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/environment.txt"

"$PYTHON" benchmarks/bench_attention.py \
    --shape sd15 --device cuda --dtype float16 \
    --height 512 --width 512 --steps 50 \
    --batch-sizes 1 4 --warmup 2 --repeats 5 \
    --json "$OUT/bench_attention_sd15_fp16.json" | tee "$OUT/bench_attention_sd15_fp16.txt"

"$PYTHON" benchmarks/bench_processor.py --device cuda --dtype float16 --images 1 4 --repeats 50 \
    --json "$OUT/bench_processor_sd15_fp16.json" | tee "$OUT/bench_processor_sd15_fp16.txt"

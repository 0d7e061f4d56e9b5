#!/usr/bin/env bash
# The one script to run on the GPU machine (H100/H200), from the repository root:
#
#     OUT=/some/folder bash benchmarks/run_gpu.sh
#
# SD v1.5's architecture with random weights (benchmarks/sd15_random.py: nothing is downloaded), 512x512,
# 50 DDIM steps, float16, batch 1 and 4; plain vs layout-guided (defaults) vs modulation at every step,
# interleaved, 2 warm-up + 5 timed rounds each; then the one-layer microbenchmark (seconds); then peak memory
# and time of one UNet step with CFG (plain / cross-attention modulation / + self-attention strength 0.3) at
# SD 1.5's 512 px and SD 2.x's 768 px, one fresh process per configuration (bench_memory.py, about a minute);
# last, SDXL base's architecture with random weights (benchmarks/sdxl_random.py: 2.57B-parameter UNet, nothing is
# downloaded) at 1024x1024, 30 Euler steps, float16, batch 1: plain vs layout vs modulation at every step,
# interleaved, 1 warm-up + 3 timed rounds, peak memory each, then each phrase's cross-attention share inside its
# box (bench_sdxl.py; estimated 1-2 minutes, not measured).
# Expected about 5-7 minutes on an H100 (not yet run on one: the budget is ~8 minutes).
#
# Installs nothing from the network. If diffusers is missing, it is installed from wheels carried in ./.whl or
# ./wheels (pip install --no-index). torch and transformers must already be there.
# Results: $OUT/bench_attention_sd15_fp16.json (every number) and .txt (the table), the same for
# bench_processor (one cross-attention layer per UNet level, seconds), bench_memory_$DTYPE.json/.txt (peak
# torch.cuda.max_memory_allocated above the loaded UNet, per configuration), bench_sdxl_${XL_SHAPE}_$DTYPE.json/.txt
# (SDXL: seconds per image, ratios, peak memory, attention shares inside the boxes), and $OUT/environment.txt.
#
# Dry run on a CPU at tiny shapes (checks the script end to end before spending GPU time):
#
#     DEVICE=cpu SHAPE=tiny DTYPE=float32 SIZE=32 STEPS=4 WARMUP=1 REPEATS=1 PROC_REPEATS=1 \
#         OUT=/tmp/gpu_dry_run bash benchmarks/run_gpu.sh
set -euo pipefail
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-sd15}
DTYPE=${DTYPE:-float16}
SIZE=${SIZE:-512}
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-2}
REPEATS=${REPEATS:-5}
PROC_REPEATS=${PROC_REPEATS:-50}
# bench_memory's shapes: SD 1.5 at 512 px and SD 2.x at 768 px (the tiny UNet for a dry run)
MEM_SHAPES=${MEM_SHAPES:-$([ "$SHAPE" = tiny ] && echo tiny || echo "sd15 sd2")}
# bench_sdxl: SDXL base's architecture at 1024 px, 30 steps (tiny SDXL components at 64 px for a dry run)
XL_SHAPE=${XL_SHAPE:-$([ "$SHAPE" = tiny ] && echo tiny || echo sdxl)}
XL_SIZE=${XL_SIZE:-$([ "$SHAPE" = tiny ] && echo 64 || echo 1024)}
XL_STEPS=${XL_STEPS:-$([ "$SHAPE" = tiny ] && echo "$STEPS" || echo 30)}
XL_WARMUP=${XL_WARMUP:-1}
XL_REPEATS=${XL_REPEATS:-3}

# shellcheck source=benchmarks/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"

"$PYTHON" benchmarks/bench_attention.py \
    --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
    --height "$SIZE" --width "$SIZE" --steps "$STEPS" \
    --batch-sizes 1 4 --warmup "$WARMUP" --repeats "$REPEATS" \
    --json "$OUT/bench_attention_${SHAPE}_${DTYPE}.json" | tee "$OUT/bench_attention_${SHAPE}_${DTYPE}.txt"

"$PYTHON" benchmarks/bench_processor.py --device "$DEVICE" --dtype "$DTYPE" --images 1 4 --repeats "$PROC_REPEATS" \
    --json "$OUT/bench_processor_sd15_${DTYPE}.json" | tee "$OUT/bench_processor_sd15_${DTYPE}.txt"

# shellcheck disable=SC2086  # MEM_SHAPES is a list of words
"$PYTHON" benchmarks/bench_memory.py --device "$DEVICE" --dtype "$DTYPE" --shapes $MEM_SHAPES \
    --json "$OUT/bench_memory_${DTYPE}.json" | tee "$OUT/bench_memory_${DTYPE}.txt"

"$PYTHON" benchmarks/bench_sdxl.py --shape "$XL_SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
    --height "$XL_SIZE" --width "$XL_SIZE" --steps "$XL_STEPS" --batch-sizes 1 \
    --warmup "$XL_WARMUP" --repeats "$XL_REPEATS" \
    --json "$OUT/bench_sdxl_${XL_SHAPE}_${DTYPE}.json" | tee "$OUT/bench_sdxl_${XL_SHAPE}_${DTYPE}.txt"

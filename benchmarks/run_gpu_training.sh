#!/usr/bin/env bash
# What each gradient mode of training/train_refl.py costs on SD v1.5's architecture (random weights,
# benchmarks/sd15_random.py), on a GPU (H100/H200), from the repository root:
#
#     OUT=/some/folder bash benchmarks/run_gpu_training.sh
#
# 512x512, T = 50 DDIM steps, float16 autocast, batch 1: the reward term of one micro-step (chain, VAE decode with
# gradient, a brightness reward, backward) for ReFL (gradient step at the middle of [30, 50)), DRaFT-K with
# K = 1, 15, 38 (reaching into the first third of the steps) and the full chain (K = 50), each DRaFT with and
# without per-step checkpointing; LoRA (rank 64, as docs/training.md's example) then full fine-tuning.
# Each configuration is measured (peak torch.cuda.max_memory_allocated above the loaded model, median of
# 3 timed rounds after 1 warm-up, modes interleaved) and also estimated from one step (--validate: the method
# the CPU estimate in docs/training.md used, with its error at this size). A mode that does not fit the card
# is reported as out of memory. Expected about 5 minutes on an H100 (not yet run on one).
#
# Results: $OUT/training_cost_sd15_{lora,full}_$DTYPE.json (every number) and .txt (the tables), and
# $OUT/environment.txt. Installs nothing from the network (see gpu_setup.sh for carrying diffusers as a wheel).
#
# Dry run on a CPU at tiny shapes (checks the script end to end before spending GPU time):
#
#     DEVICE=cpu SHAPE=tiny DTYPE=float32 SIZE=32 STEPS=4 KS="1 4" RANGE="2 4" RANK=4 WARMUP=0 REPEATS=1 \
#         CONFIGS=lora OUT=/tmp/gpu_training_dry_run bash benchmarks/run_gpu_training.sh
set -euo pipefail
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-sd15}
DTYPE=${DTYPE:-float16}
SIZE=${SIZE:-512}
STEPS=${STEPS:-50}
KS=${KS:-1 15 38 50}
RANGE=${RANGE:-30 50}
RANK=${RANK:-64}
WARMUP=${WARMUP:-1}
REPEATS=${REPEATS:-3}
CONFIGS=${CONFIGS:-lora full}

# shellcheck source=benchmarks/gpu_setup.sh
source "$(dirname "$0")/gpu_setup.sh"

# shellcheck disable=SC2086  # CONFIGS, KS and RANGE are lists of words
for CONFIG in $CONFIGS; do
    "$PYTHON" benchmarks/bench_training_cost.py --validate --config "$CONFIG" --rank "$RANK" \
        --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" --size "$SIZE" --steps "$STEPS" \
        --ks $KS --grad-step-range $RANGE --warmup "$WARMUP" --repeats "$REPEATS" \
        --json "$OUT/training_cost_${SHAPE}_${CONFIG}_${DTYPE}.json" \
        | tee "$OUT/training_cost_${SHAPE}_${CONFIG}_${DTYPE}.txt"
done

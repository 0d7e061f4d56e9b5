# Sourced by the GPU scripts (run_gpu.sh, run_gpu_training.sh): goes to the repository root, sets PYTHON, OUT,
# PYTHONPATH and offline mode, installs diffusers from carried wheels if it is missing (no network there), and
# writes $OUT/environment.txt. Reads DEVICE (cuda, or cpu for a dry run).
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"

export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DIFFUSERS_VERBOSITY=error

# diffusers (and anything else missing there) travels as wheels in .whl/ (or wheels/), made here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
WHEELS=${WHEELS:-$( [ -d .whl ] && echo .whl || echo wheels )}
if ! "$PYTHON" -c "import diffusers" >/dev/null 2>&1; then
    if [ -d "$WHEELS" ]; then
        echo "diffusers is missing: installing $WHEELS/*.whl into /tmp/site (no network)" >&2
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "diffusers is missing and there is no $WHEELS folder to install it from" >&2
        exit 1
    fi
fi

{
    DEVICE=$DEVICE "$PYTHON" - <<'EOF'
import platform, torch, transformers, diffusers, realign_pipeline
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| diffusers", diffusers.__version__,
      "| realign_pipeline", realign_pipeline.__version__, realign_pipeline.__file__)
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
import os
if os.environ.get("DEVICE", "cuda") == "cuda" and not torch.cuda.is_available():
    raise SystemExit("no CUDA device: this script is for the GPU machine (DEVICE=cpu for a dry run)")
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
    git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$OUT/environment.txt"


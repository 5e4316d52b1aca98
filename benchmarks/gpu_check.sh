#!/usr/bin/env bash
# One-GPU training check (≤ 5 min): a ~1B Llama on random tokens at 8k context, bf16 autocast, gradient
# checkpointing, packed vs padded (the seed's collator); tokens/s and MFU against this GPU's measured bf16 matmul peak.
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU, torch + transformers (+ numpy) installed
#   bash benchmarks/gpu_check.sh --tiny     # the same code on CPU, tiny sizes (a smoke test of the script)
#
# No network, no ../shared, no accelerate/deepspeed/datasets needed: the model is built from its config, the data are
# seeded random tokens, and the project code used (collator, packing plan) lives in src/. The last stdout line is
# one JSON object; it is also written to $OUT/gpu_check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
"$PY" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "numpy") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing packages: {missing}")
PY
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
log="$(mktemp)"
timeout 290 "$PY" benchmarks/gpu_check.py "$@" | tee "$log"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && tail -n 1 "$log" > "$OUT/gpu_check.json"
fi

#!/usr/bin/env bash
# Every GPU check and timing weightlens owes, in one call of under 8 minutes on a lent GPU machine:
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=540)   (the device tool; $OUT comes back)
# What it runs, what each step measures and where it goes: docs/scale.md ("On a GPU"). In short:
#   tests_cuda     the CUDA tests (marked gpu, skipped without CUDA) of linalg, batched decompositions, LAP
#   drivers        benchmarks/bench_linalg.py on CUDA: every cuSOLVER driver per shape (the driver table)
#   batched        benchmarks/bench_gpu.py: batched against per-matrix SVDs on MiniLM and ViT-B/32 shapes; TSV-M,
#                  Iso-C, Iso-CTS, STAR merges batched and per key, against a FusionBench-style per-key baseline
#   lap, rebasin   benchmarks/bench_lap.py and bench_rebasin.py on CUDA (the auction LAP, GPU cost matrices)
# The machine reaches no package index: weightlens runs from this working tree (PYTHONPATH) on the machine's own
# python with its CUDA torch ($PYTHON overrides); a missing dependency shows in $OUT/device.txt and fails only
# the steps that need it. Each step has its own timeout, and the session stops starting steps when less than
# its budget ($BUDGET seconds, default 450) is left, so the call ends well inside 8 minutes. A step that fails
# or times out is recorded and the next one runs. The summary table is printed last and kept in
# $OUT/summary.md; each step's output is $OUT/<step>.txt (bench_gpu also writes $OUT/batched.json).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WEIGHTLENS_HOME="${WEIGHTLENS_HOME:-${TMPDIR:-/tmp}/weightlens-gpu-session}"
OUT="${OUT:-gpu-out}"
PY="${PYTHON:-python}"
BUDGET="${BUDGET:-450}"
START=$SECONDS
mkdir -p "$OUT"
ROWS=()

GPU=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1) \
    || GPU="no GPU (nvidia-smi failed: $GPU)"
{
    echo "$GPU"
    timeout 60 "$PY" - <<'PYEOF' || echo "python failed"
import importlib
for name in ["torch", "numpy", "scipy", "safetensors", "pandas", "tqdm", "yaml", "threadpoolctl", "plotly", "pytest",
             "fusion_bench"]:
    try:
        importlib.import_module(name)
        print("ok", name)
    except Exception as exc:  # a broken install counts as missing
        print("MISSING", name, type(exc).__name__)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())
PYEOF
} > "$OUT/device.txt" 2>&1

step() {  # name, timeout in seconds, command...: one step with its own log; never stops the session
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        ROWS+=("| $name | skipped | 0 | budget spent ($BUDGET s) |")
        return 0
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1 || rc=$?
    local status="ok"
    ((rc == 124 || rc == 137)) && status="TIMED OUT after $limit s"
    ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
    ROWS+=("| $name | $status | $((SECONDS - t0)) | $OUT/$name.txt |")
    return 0
}

step tests_cuda 90 "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_linalg.py tests/test_batched.py tests/test_rebasin_lap.py -k "cuda or gpu"
step drivers 50 "$PY" benchmarks/bench_linalg.py --devices cuda \
    --shapes 384x384,1536x384,768x768,2304x768,3072x768,768x3072,4096x4096,8x768x768
step batched 190 "$PY" benchmarks/bench_gpu.py --device cuda --tasks 8 --blocks 2 --json "$OUT/batched.json"
step lap 40 "$PY" benchmarks/bench_lap.py --widths 512 2048 4096 --threads 16
step rebasin 40 "$PY" benchmarks/bench_rebasin.py --device cuda --repeat 1

{
    echo "## gpu_session.sh on $GPU: $((SECONDS - START)) s in all"
    echo
    echo "| step | status | seconds | output |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} > "$OUT/summary.md"
cat "$OUT/summary.md"

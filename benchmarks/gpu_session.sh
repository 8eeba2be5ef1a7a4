#!/usr/bin/env bash
# Every GPU check and timing weightlens still owes, in one call on a lent GPU machine (about 10 min):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)   (device tool; outputs come back from $OUT)
# The machine reaches no package index: weightlens runs from the working tree (PYTHONPATH) on the machine's
# own python with its CUDA torch ($PYTHON overrides), and a missing dependency is reported in
# $OUT/device.txt instead of stopping the rest. Record the tables in
# benchmarks/RESULTS.md with the device named, then edit linalg/devices.py (CUDA_DRIVER_TABLE) and the
# LAP default (rebasin/lap.py) from what they show.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-gpu-out}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
    for m in torch numpy scipy safetensors pandas tqdm yaml threadpoolctl plotly pytest; do
        "$PY" -c "import $m" 2>/dev/null && echo "ok $m" || echo "MISSING $m"
    done
} > "$OUT/device.txt" 2>&1
step() {  # name, command...: run one step with its own log, never stop the session
    local name=$1; shift
    echo "== $name: $*" >> "$OUT/summary.txt"
    ( time "$@" ) > "$OUT/$name.txt" 2>&1
    echo "   exit $?" >> "$OUT/summary.txt"
}
step tests_cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_linalg.py tests/test_rebasin_lap.py -k "cuda or gpu"
step bench_linalg "$PY" benchmarks/bench_linalg.py --devices cpu,cuda
step bench_lap "$PY" benchmarks/bench_lap.py --widths 512 2048 4096 8192 --threads 16
step bench_rebasin "$PY" benchmarks/bench_rebasin.py --device cuda --repeat 1
cat "$OUT/summary.txt"

#!/usr/bin/env bash
# Runs the benchmarks and saves each one's output as benchmarks/results/<machine>-<script>.txt, its first line
# saying when and where, then regenerates README.md's performance section from them (readme_performance.py).
#   benchmarks/run.sh cpu    the CPU set (`make bench`)
#   benchmarks/run.sh gpu    on a CUDA machine: the installed builds, the CUDA tests, then the GPU set
#   benchmarks/run.sh cpu geometry rerank    only those benchmarks of the set
# PYTHON defaults to .venv/bin/python.
set -u
cd "$(dirname "$0")/.."
MACHINE=${1:-cpu}
ONLY=" ${*:2} "
PY=${PYTHON:-.venv/bin/python}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "$MACHINE" = gpu ]; then
    WHERE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
else
    WHERE=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
fi
STAMP="measured $(date -u +%Y-%m-%d) on ${WHERE:-an unknown machine}, $(nproc) CPU cores"

run() {  # run NAME TIMEOUT ARGS...: one benchmark, its output saved after the stamp; a failure says so there
    local name=$1 limit=$2
    shift 2
    [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0
    { echo "$STAMP"; timeout "$limit" $PY "benchmarks/$name.py" "$@" 2>&1; rc=$?
      [ $rc = 0 ] || echo "FAILED: exit status $rc (124: stopped after $limit s)"; } \
        | grep -v -E '^WARNING|it/s\]|chunk/s\]' | tee "$RESULTS/$MACHINE-$name.txt"
}

if [ "$MACHINE" = gpu ]; then
    $PY - <<'PYTHON'
import torch, faiss
print(f"torch {torch.__version__}: CUDA {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""))
print(f"faiss {faiss.__version__}: GPUs {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}")
try:
    import onnxruntime
    print(f"onnxruntime {onnxruntime.__version__}: {onnxruntime.get_available_providers()}")
except ImportError:
    print("onnxruntime not installed")
PYTHON
    run frame_latency 200 --images 100000
    run rerank 100
    # The tests that skip without CUDA, and the ONNX graphs against torch.
    timeout 100 $PY -m pytest -q -p no:cacheprovider -k "cuda or graph_matches" \
        test/test_geo.py test/test_mapdb.py test/test_rerank_classic.py test/test_rerank_learned.py \
        test/test_descriptors.py test/test_onnx.py
    run train_step 60
    run descriptors 75
    run geometry 70
else
    run million_map 3600
    run rerank 900
    run geometry 900
    run descriptors 600
    run offline_descriptor 1200     # needs `make demo`'s towns
    run train_step 600
    run calibration 1800    # needs `make demo`'s map and drive
fi
$PY benchmarks/readme_performance.py

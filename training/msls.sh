#!/usr/bin/env bash
# Train the GNN re-ranker on Mapillary SLS as in the thesis: describe every image once (sharded over the GPUs),
# one map per city from those descriptors, then vpr-train's two steps with DistributedDataParallel.
# Usage: training/msls.sh MSLS_ROOT NETVLAD_WEIGHTS OUT_DIR   (run from the repository, after `make setup`)
# Environment: GPUS = processes per machine (default: the CUDA devices, or 1), BATCH = images per batch (32).
# Every stage resumes when started again with the same arguments.
set -euo pipefail
msls=${1:?MSLS root}; weights=${2:?NetVLAD weights, e.g. Pitts30K_struct.mat}; out=${3:?output folder}
bin=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin
gpus=${GPUS:-$("$bin/python" -c "import torch; print(max(1, torch.cuda.device_count()))")}
run=("$bin/torchrun" --standalone --nproc-per-node "$gpus")

train_cities="trondheim london boston melbourne amsterdam helsinki tokyo toronto saopaulo moscow zurich
              paris bangkok budapest austin berlin ottawa phoenix goa amman nairobi manila"
val_cities="cph sf"

cities=()
for city in $train_cities $val_cities; do
    if [ -d "$msls/train_val/$city" ]; then cities+=("$city"); else echo "skipping $city: not in $msls/train_val" >&2; fi
done
descriptors="$out/descriptors.h5"
[ -f "$descriptors" ] || "${run[@]}" "$bin/vpr-map" describe --msls "$msls" --cities "$(IFS=,; echo "${cities[*]}")" \
    --sides database,query --model "$weights" --out "$descriptors" --batch-size "${BATCH:-32}" --workers 4

args=()
for city in "${cities[@]}"; do
    [ -f "$out/maps/$city/map.json" ] || \
        "$bin/vpr-map" build --msls "$msls" --cities "$city" --descriptors "$descriptors" --out "$out/maps/$city"
    case " $val_cities " in *" $city "*) role=--val ;; *) role=--train ;; esac
    args+=("$role" "$city=$out/maps/$city")
done
"${run[@]}" "$bin/vpr-train" --msls "$msls" "${args[@]}" --descriptors "$descriptors" --out "$out/run"

#!/usr/bin/env bash
# Train the GNN re-ranker on Mapillary SLS as in the thesis: one map per city, then vpr-train's two steps.
# Usage: training/msls.sh MSLS_ROOT NETVLAD_WEIGHTS OUT_DIR   (run from the repository, after `make setup`)
set -euo pipefail
msls=${1:?MSLS root}; weights=${2:?NetVLAD weights, e.g. Pitts30K_struct.mat}; out=${3:?output folder}
bin=$(dirname "$0")/../.venv/bin

train_cities="trondheim london boston melbourne amsterdam helsinki tokyo toronto saopaulo moscow zurich
              paris bangkok budapest austin berlin ottawa phoenix goa amman nairobi manila"
val_cities="cph sf"

args=()
for city in $train_cities $val_cities; do
    [ -d "$msls/train_val/$city" ] || { echo "skipping $city: not in $msls/train_val" >&2; continue; }
    [ -f "$out/maps/$city/map.json" ] || \
        "$bin/vpr-map" build --msls "$msls" --cities "$city" --model "$weights" --out "$out/maps/$city"
    case " $val_cities " in *" $city "*) role=--val ;; *) role=--train ;; esac
    args+=("$role" "$city=$out/maps/$city")
done
"$bin/vpr-train" --msls "$msls" "${args[@]}" --model "$weights" --out "$out/run"

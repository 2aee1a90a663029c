#!/usr/bin/env bash
# The GPU speed checks of issue 8 in one run, each under its own time limit, so that a short lease on
# a GPU machine gives all three tables. From the project root on the GPU machine (after the wheels of
# ../shared/tools/gpu-wheels are installed into .site and PYTHONPATH is set, as its header says):
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# Each script's output goes to OUT_DIR/<name>.txt (default: ./gpu-results); a part that runs past
# its limit is cut and the next one starts.
set -uo pipefail
out=${1:-gpu-results}
mkdir -p "$out"
run() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "   exit $? ($(tail -n 1 "$out/$name.txt" | cut -c1-120))"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
run attention_overhead 150 python benchmarks/attention_overhead.py --preset sdxl --device cuda --dtype bfloat16 \
    --resolution 1024 --subjects 1 2 4
run generate 240 python benchmarks/generate.py --device cuda --dtype bfloat16 --repeats 2 --compile
run gpu_sdxl 200 python benchmarks/gpu_sdxl.py --device cuda --dtype bfloat16 --batch 8

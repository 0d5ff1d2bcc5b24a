#!/usr/bin/env bash
# GPU call for the weight-only linears (issues 13 and 16): the kernel tests on the GPU, bench/quant_tune.py
# (writes kernels/tuned_configs.json, copied to $OUT), then batch-1 latency of fp16 / int8 / int4 per shape,
# each in its own process. Run through the device tool with carry [".whl"] (gguf, the one package the image
# lacks): bash bench/device_quant.sh [tune|latency|all]
set -uo pipefail
MODE=${1:-all}
OUT=${OUT:-var/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
T0=$(date +%s); el() { echo "== $(( $(date +%s) - T0 ))s: $*"; }
if [[ $MODE == tune || $MODE == all ]]; then
  el "kernel tests on the GPU"
  TRITON_INTERPRET= timeout 150 python3 -m pytest -q -x --confcutdir tests/kernels -p no:cacheprovider \
    tests/kernels/test_quant_linear.py 2>&1 | tail -4
  el "tune"
  timeout ${TUNE_S:-360} python3 bench/quant_tune.py --rows 1 --rows 8 --write > "$OUT/tune.txt" 2>&1
  grep -v "^  skip" "$OUT/tune.txt" | grep -E "GB/s|copy|wrote|Error|error" | tail -90
  cp kernels/tuned_configs.json bench/results/quant_tune.json "$OUT/" 2>/dev/null
fi
if [[ $MODE == int4 ]]; then
  el "int4 tune (quick grid)"
  timeout ${TUNE_S:-90} python3 bench/quant_tune.py --quick --shape gpt2-xl --rows 1 --format int4-g64 \
    --format int4-g128 --write --name quant_tune_int4 > "$OUT/tune_int4.txt" 2>&1
  grep -E "GB/s|wrote|Error" "$OUT/tune_int4.txt" | tail -12
  cp kernels/tuned_configs.json "$OUT/" 2>/dev/null
fi
if [[ $MODE == latency || $MODE == all ]]; then
  for shape in ${SHAPES:-gpt2 gpt2-xl}; do
    for q in ${SCHEMES:-none int8 int4-g64}; do
      el "latency $shape $q"
      timeout ${LAT_S:-120} python3 bench/latency.py --shape "$shape" --quantization "$q" --skip-hf \
        --new-tokens 64 > "$OUT/lat_${shape}_${q}.txt" 2>&1
      tail -4 "$OUT/lat_${shape}_${q}.txt"
    done
  done
fi
el "done"

#!/usr/bin/env bash
# One device call for the engine-side GPU numbers of issues 13 (quantised XL batch-1), 14 (speculation on XL
# with a draft's real cost, the batch-size table) and 15 (LoRA throughput, batch-1 and hot load on GPT-2 124M
# and XL), all on RANDOM weights, each step in its own process, in priority order inside one time budget.
#
#   carry: [".whl-serving", ".whl"]  (the engine imports xgrammar, JSON logs and OpenTelemetry: .whl-serving has
#   them, from `bash bench/serving_device.sh prepare`; .whl holds gguf, openai-whisper and, when it fits in the
#   64 MiB, bitsandbytes: see docs/parts/17's "GPU" section)
#   command: RUVON_COMMIT=<git rev-parse HEAD> bash bench/device_round.sh      timeout_s: 600
#
# A step that would start with less than its minimum left is recorded as NOT RUN. Every step's output and
# the JSON files it wrote go to one archive, $OUT/round.tgz (the device returns at most eight files), and the
# log to $OUT/log.txt. Random GPT-2 checkpoints are initialised once and shared by the steps
# (RUVON_BENCH_WEIGHTS, bench/peers.py). Knobs: BUDGET_S (default 560), STEPS (names, default all, in order),
# e.g. a second call: STEPS="profile-xl tput-gpt2 tput-xl lat-xl-bnb-int8 lat-xl-bnb-nf4" BUDGET_S=300.
set -uo pipefail
OUT=${OUT:-var/device-out}
BUDGET_S=${BUDGET_S:-560}
STAGE=/tmp/round-stage
rm -rf "$STAGE" && mkdir -p "$OUT" "$STAGE"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

for dir in ${WHEELS:-.whl-serving .whl}; do  # one pip call per folder: a package in both is simply replaced
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$dir"/*.whl || exit 1
done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RUVON_BENCH_WEIGHTS=/tmp/ruvon-bench-weights
mkdir -p "$RUVON_BENCH_WEIGHTS"
echo "commit ${RUVON_COMMIT:-unknown}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv

# step NAME MIN_S MAX_S command...: run it with what is left (at most MAX_S), keep its output and JSON.
step() {
    local name=$1 min=$2 max=$3
    shift 3
    if [[ -n ${STEPS:-} && " $STEPS " != *" $name "* ]]; then return; fi
    local budget
    budget=$(left)
    if ((budget < min)); then
        echo "== $name: NOT RUN ($budget s left, needs $min)"
        return
    fi
    ((budget > max)) && budget=$max
    echo "== $name: start at $(($(date +%s) - T0)) s, limit $budget s"
    rm -rf bench/results
    timeout "$budget" "$@" >"$STAGE/$name.txt" 2>&1
    echo "== $name: rc $? after $(($(date +%s) - T0)) s"
    grep -vE "it/s\]|Loading weights|Writing model|deprecated" "$STAGE/$name.txt" | tail -n 14
    for f in bench/results/*.json; do [[ -f $f ]] && cp "$f" "$STAGE/$name-$(basename "$f")"; done
}

PY=${PYTHON:-python3}
XL=${XL_SHAPE:-gpt2-xl}      # the local proof: XL_SHAPE=tiny SMALL_SHAPE=tiny PYTHON=.venv/bin/python DEVICE=cpu
SMALL=${SMALL_SHAPE:-gpt2}
DEV=${DEVICE:-cuda}
XL_LAT=("$PY" bench/latency.py --device "$DEV" --shape "$XL" --new-tokens "${LAT_TOKENS:-128}" --prompt-len "${LAT_PROMPT:-128}")
read -ra LORA_EXTRA <<<"${LORA_ARGS:-}"  # the local proof shrinks the workload
LORA=("$PY" bench/lora.py --device "$DEV" --requests 512 --adapters 64 --latency-tokens 128 "${LORA_EXTRA[@]}")
SPEC=("$PY" bench/speculative.py --device "$DEV" --model "random:$XL" --oracle-draft "random:$SMALL" --workloads chat
    --no-ngram)
read -ra SPEC_EXTRA <<<"${SPEC_ARGS:-}"  # the local proof shrinks these runs

# Programmatic dependent launch (kernels/pdl.py, RUVON_PDL=1): first that it changes no token, then batch-1
# rows with it, each beside the same row without it (lat-gpt2, lat-xl-fp16, lat-xl-int8), each in its own process.
step gpu-tests-pdl 40 150 bash -c "TRITON_INTERPRET= $PY -m pytest -q -p no:cacheprovider --confcutdir tests/gpu_worker \
    tests/gpu_worker/engine/test_gpu.py -k programmatic"
SMALL_LAT=("$PY" bench/latency.py --device "$DEV" --shape "$SMALL" --skip-hf --new-tokens "${LAT_TOKENS:-256}"
    --prompt-len "${LAT_PROMPT:-128}")
step lat-gpt2-pdl 40 80 env RUVON_PDL=1 "${SMALL_LAT[@]}"
step lat-gpt2 40 80 "${SMALL_LAT[@]}"
step lat-xl-none-pdl 50 90 env RUVON_PDL=1 "${XL_LAT[@]}" --skip-hf
step lat-xl-fp16 50 90 "${XL_LAT[@]}" --skip-hf  # lat-xl-none without the peer, beside the row above
step lat-xl-int8-pdl 45 80 env RUVON_PDL=1 "${XL_LAT[@]}" --skip-hf --quantization int8
step spec-xl-batch1 60 150 "${SPEC[@]}" --num-blocks 4000 --streams 1 --k 2 4 6 --oracle-alpha 0.5 0.7 0.8 0.9 \
    --new-tokens 128 --out speculative-xl-oracle-draft "${SPEC_EXTRA[@]}"
# Tune XL's one-row projections (int4 g128, int8, fp16: the table's tile shape against quant_gemv's register
# tiles) and keep the table the later steps read; it comes back in the archive as tune-xl-tuned_configs.json.
step tune-xl 60 200 bash -c "$PY bench/quant_tune.py --shape $XL --rows 1 --format int4-g128 --format int8 \
    --format fp16 --quick --write --name quant-tune-xl; cp kernels/tuned_configs.json bench/results/"
step lat-xl-none 60 110 "${XL_LAT[@]}"
step lat-xl-int8 45 80 "${XL_LAT[@]}" --skip-hf --quantization int8
step lat-xl-int4-g128 45 80 "${XL_LAT[@]}" --skip-hf --quantization int4-g128
# Each LoRA path in its own process: in one process the first LoRA engine paid first-use costs the second did
# not (docs/parts/18-lora.md, "Third run").
step lat-xl-int4-emb8 45 80 "${XL_LAT[@]}" --skip-hf --quantization int4-g128 --quantize-embeddings
step lora-place-xl 30 60 "$PY" bench/lora_place.py --shape "$XL" --device "$DEV"
step lora-gpt2 90 170 "${LORA[@]}" --shape "$SMALL" --lora-paths epilogue
step lora-gpt2-unfused 90 170 "${LORA[@]}" --shape "$SMALL" --lora-paths unfused --skip-hf
step gpu-tests 40 100 bash -c "TRITON_INTERPRET= $PY -m pytest -q -p no:cacheprovider --confcutdir tests/gpu_worker \
    tests/gpu_worker/engine/test_gpu.py tests/gpu_worker/lora/test_gpu_lora.py \
    -k 'draft_model or verification or batch_table or lora'; TRITON_INTERPRET= $PY -m pytest -q -p no:cacheprovider \
    --confcutdir tests/kernels tests/kernels/test_lora_fused.py tests/kernels/test_lora.py tests/kernels/test_lora_epilogue.py tests/kernels/test_quant_linear.py"
step spec-xl-table 120 200 "${SPEC[@]}" --num-blocks 6000 --max-num-seqs 256 --streams 1 2 4 8 16 32 64 --k 2 4 6 \
    --oracle-alpha 0.8 --new-tokens 64 --write-table bench/results/spec-table-xl.json \
    --table-proposer "ORACLE+DRAFT alpha=0.8" --under-load 512 --out speculative-xl-table "${SPEC_EXTRA[@]}"
step lora-xl 90 170 "${LORA[@]}" --shape "$XL" --skip-hf --new-tokens 64 --lora-paths epilogue
step profile-xl 50 90 "$PY" bench/profile_step.py --shape "$XL" --batch 1 --steps 30 --prompt-len "${LAT_PROMPT:-128}"
step tput-gpt2 60 120 "$PY" bench/throughput.py --device "$DEV" --shape "$SMALL" --decode-steps 1 --decode-steps 8
step tput-xl 80 150 "$PY" bench/throughput.py --device "$DEV" --shape "$XL" --decode-steps 1 --decode-steps 8 \
    --skip-hf
step tput-xl-int8 80 150 "$PY" bench/throughput.py --device "$DEV" --shape "$XL" --decode-steps 1 --decode-steps 8 \
    --skip-hf --quantization int8
step tput-xl-int4 80 150 "$PY" bench/throughput.py --device "$DEV" --shape "$XL" --decode-steps 1 --decode-steps 8 \
    --skip-hf --quantization int4-g128
step lat-xl-bnb-int8 45 70 "${XL_LAT[@]}" --skip-hf --quantization bnb-int8
step lat-xl-bnb-nf4 45 70 "${XL_LAT[@]}" --skip-hf --quantization bnb-nf4

tar -czf "$OUT/round.tgz" -C "$STAGE" .
echo "== done at $(($(date +%s) - T0)) s"

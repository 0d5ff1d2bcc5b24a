#!/usr/bin/env bash
# GPU benches on one machine, run from the repository root (through the device tool, which sets $OUT).
#
#   bash bench/device_run.sh [compare|full]
#
# compare (default): this tree ("after") against the exported older tree in .before/ ("before"), Ruvon
#   against Ruvon (no HF peer where a script allows it: cfdb967's latency.py still runs its peer), latency
#   and throughput for gpt2 and gpt2-xl at --decode-steps 1 and 8; then bench/compare.py. About 6 minutes
#   on an H200. BENCHES=kernels compares kernels_bench --quick instead (a few minutes; all three together
#   would pass the 9 minutes a call should keep to).
# full: this tree only, HF peer included, latency, throughput and kernels_bench --quick. About 6 minutes.
#
# Writes under $OUT (default var/device-out): log.txt, and before.json/.md, after.json/.md, compare.md
# (compare) or full.json/.md (full). The whole script keeps to BUDGET_S seconds (default 540; before gets
# 55% of it in compare mode), each bench process to PER_PROCESS_S (default 240): a process that would start
# with under 30 s left is recorded as not run, and all.py rewrites its JSON after each process, so a run cut
# short still returns what it measured.
#
# ALL_ARGS adds bench/all.py flags to every call, e.g. the CPU smoke test of this script:
#   OUT=/tmp/dev ALL_ARGS='--device cpu --dtype float32 --shape tiny --decode-steps 1
#     --latency-args "--prompt-len 16 --new-tokens 16" --throughput-args "--requests 4 --max-prompt 16"'
#
# Prepare locally (see bench/all.py), then call the device tool with carry [".before", ".whl"]:
#   echo /.before/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#   rm -rf .before && mkdir .before && git archive cfdb967 | tar -x -C .before && git rev-parse cfdb967 >.before/COMMIT
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl gguf==0.19.0     # the one package the GPU image lacks
#   command: RUVON_COMMIT=<this checkout's git rev-parse HEAD, pasted> bash bench/device_run.sh compare
set -uo pipefail

MODE=${1:-compare}
OUT=${OUT:-var/device-out}
PER_PROCESS_S=${PER_PROCESS_S:-240}
BUDGET_S=${BUDGET_S:-540}
BENCHES=${BENCHES:-latency throughput}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

bench_flags=()
for b in $BENCHES; do bench_flags+=(--bench "$b"); done
eval "extra=(${ALL_ARGS:-})"  # a developer's own flags, quoted as on a command line

# Fail in seconds, not minutes, if a package is missing: import every bench module of each tree.
preflight() {
    local tree=$1
    (cd "$tree" && PYTHONPATH="/tmp/site:$PWD" "$PY" -c '
import sys, torch, triton, transformers
sys.path.insert(0, ".")
import bench.latency, bench.throughput, bench.kernels_bench
print(sys.argv[1], "imports ok: torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "cuda", torch.cuda.is_available())
' "$tree") || exit 1
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.sm,memory.used,memory.total --format=csv || true
preflight .
"$PY" -c 'import bench.all, bench.compare' || exit 1

case "$MODE" in
compare)
    [ -d .before/bench ] || { echo ".before/ is missing: export it first (see the top of this script)"; exit 1; }
    preflight .before
    before_commit=$(cat .before/COMMIT 2>/dev/null || echo cfdb967)
    "$PY" bench/all.py --out "$OUT" --tree .before --label before --commit "$before_commit" --no-peer \
        --timeout "$PER_PROCESS_S" --budget $(((BUDGET_S - SECONDS) * 55 / 100)) "${bench_flags[@]}" "${extra[@]}"
    "$PY" bench/all.py --out "$OUT" --label after --no-peer \
        --timeout "$PER_PROCESS_S" --budget $((BUDGET_S - SECONDS - 10)) "${bench_flags[@]}" "${extra[@]}"
    "$PY" bench/compare.py "$OUT/before.json" "$OUT/after.json" | tee "$OUT/compare.md"
    ;;
full)
    "$PY" bench/all.py --out "$OUT" --label full --timeout "$PER_PROCESS_S" --budget $((BUDGET_S - SECONDS)) \
        "${extra[@]}"
    ;;
*)
    echo "usage: bash bench/device_run.sh [compare|full]"
    exit 2
    ;;
esac
echo "device_run.sh $MODE done after ${SECONDS} s"

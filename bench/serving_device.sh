#!/usr/bin/env bash
# bench/serving.py on the GPU machine, run from the repository root (through the device tool, which sets $OUT):
# offline engine vs embedded platform vs production shape through the openai SDK, for GPT-2 XL (RANDOM
# weights) and GPT-2 124M (RANDOM weights), a burst of 256 concurrent streams and three Poisson rates each.
#
#   bash bench/serving_device.sh            # the run (needs the carried folders below)
#   PYTHON=.venv/bin/python bash bench/serving_device.sh prepare   # here first: builds them (PyPI, apt; 30 s)
#
# The GPU image (python3 3.12) has torch, triton, transformers, safetensors, tokenizers, tiktoken, numpy and
# matplotlib, and none of the web tier, no redis-server, no PostgreSQL and no internet. So two ignored folders
# travel with the tree (about 44 MiB with it, of the 64 MiB a call may carry):
#   .whl-serving/   27 MiB: cp312 manylinux wheels of the web tier and the bench (Django's catalogues other than
#                   en dropped for size), plus assets/whisper/assets/gpt2.tiktoken (the GPT-2 BPE ranks the
#                   tokenizer finds as the openai-whisper package's file; whisper itself is not needed);
#   .redis-bin/     9.2 MiB: Debian 12's redis-server 7.0 (glibc 2.34 suffices) with the libraries an Ubuntu
#                   image may lack, behind a wrapper that sets LD_LIBRARY_PATH for redis-server alone.
# The production shape keeps its data in SQLite there (--database sqlite); the usage ingester writes it.
# PYTHON_TAG=311 ... prepare builds .whl-serving-311/ for the local CPU proof on Python 3.11 (the run picks
# .whl-serving-<tag> by the interpreter unless it is 3.12).
#
# The lead's call (device tool; kind nvidia-h200 or left out), at most about 9 minutes (BUDGET_S, install):
#   carry: [".whl-serving", ".redis-bin"]    timeout_s: 600
#   command: RUVON_COMMIT=<git rev-parse HEAD, pasted> bash bench/serving_device.sh
# If log.txt says NOT RUN for gpt2's shapes (GPT-2 XL took the budget), a second call with the same carry:
#   command: RUVON_COMMIT=<same> MODELS=gpt2 bash bench/serving_device.sh
#
# Each model gets its own bench/serving.py process per shape (so one that runs out of time costs only its rows,
# and every shape starts on an empty GPU); a process that would start with under 45 s left is recorded as not
# run. The whole script keeps to BUDGET_S (default 500), each process to PER_PROCESS_S (default 200). At the end
# the rows of each model are merged into one table (ratios against the offline rows at the same load), with
# the latency-vs-load PNG. Writes under $OUT (default var/serving-out): log.txt (with the platforms' log tails
# when a shape fails) and serving-<model>.json/.png: five files, as the device returns at most eight.
#
# Knobs (environment): MODELS (default "gpt2-xl gpt2"), REQUESTS (256), NEW_TOKENS (128), MIN_PROMPT (16),
# MAX_PROMPT (128), NUM_BLOCKS (4096 blocks of 16 tokens), WEB_PROCESSES (1), SHAPES (default "offline
# embedded production": which of bench/serving.py's shapes run, e.g. "offline production"), RATES_<model> (Poisson requests/s, e.g.
# RATES_gpt2_xl="8 24 48"), DEVICE (cuda: stop unless torch sees a GPU; cpu: hide any GPU, for the local proof).
# The local proof, on CPU with the tiny shape, from a virtualenv holding only the GPU image's packages (a bare
# venv whose site-packages link torch, numpy, transformers, safetensors, tokenizers, tiktoken, triton, matplotlib
# and their dependencies from .venv, nothing of the web tier):
#   OUT=/tmp/devout DEVICE=cpu MODELS=tiny REQUESTS=8 NEW_TOKENS=8 MAX_PROMPT=16 NUM_BLOCKS=256 \
#     RATES_tiny="2 4" PYTHON=/tmp/gpusim/bin/python bash bench/serving_device.sh
set -uo pipefail

MODE=${1:-run}
OUT=${OUT:-var/serving-out}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-500}
PER_PROCESS_S=${PER_PROCESS_S:-200}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS-gpt2-xl gpt2}  # empty: no serving table (the ladder alone)
REQUESTS=${REQUESTS:-256}
NEW_TOKENS=${NEW_TOKENS:-128}
MIN_PROMPT=${MIN_PROMPT:-16}
MAX_PROMPT=${MAX_PROMPT:-128}
NUM_BLOCKS=${NUM_BLOCKS:-4096}
WEB_PROCESSES=${WEB_PROCESSES:-1}  # the production shape's daphne processes (requests round-robin over them)
: "${RATES_gpt2_xl:=8 24 48}" "${RATES_gpt2:=16 48 96}" "${RATES_tiny:=2 4}"
SITE=/tmp/ruvon-serving-site

py_tag() { "$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")'; }
wheel_dir() { local tag=${PYTHON_TAG:-$(py_tag)}; [ "$tag" = 312 ] && echo .whl-serving || echo ".whl-serving-$tag"; }

# ------------------------------------------------------------------------------------------------- prepare
# What the web tier and the bench need beyond the GPU image (pyproject's pins). Left out: the image's own big
# ones (matplotlib and its stack, numpy: the device notes' package list), and what the serving path never
# imports (PostgreSQL's driver: SQLite here; Twisted's TLS: plain HTTP on 127.0.0.1; autobahn does import
# cryptography), to keep well under the carry limit.
WEB_TIER=(django==5.2.19 django-ninja==1.7.1 channels==4.3.2 channels-redis==4.3.0 daphne==4.2.3 redis==8.1.0
    celery==5.7.0 prometheus_client==0.26.0 django-prometheus==2.5.0 django-health-check==4.8.0
    dj-database-url==3.1.2 "httpx>=0.27,<1" openai==3.57.0 matplotlib==3.11.2 gguf==0.19.0)
# Imported by the web tier or the worker at start-up, taken without their dependencies (xgrammar's are torch,
# transformers, triton, numpy and pydantic: the image's or the list above's).
NO_DEPS=(xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 python-json-logger==4.2.0 opentelemetry-api==1.45.2
    opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 whitenoise==6.12.0 rich==15.0.0
    markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0)
LEAVE_OUT=(numpy packaging matplotlib pillow fonttools kiwisolver contourpy cycler pyparsing pyyaml requests
    urllib3 charset_normalizer tqdm psycopg psycopg_binary pyopenssl service_identity)

prepare_wheels() {
    local tag=${PYTHON_TAG:-312} dir
    dir=$(PYTHON_TAG=$tag wheel_dir)
    rm -rf "$dir" && mkdir -p "$dir" || return 1
    "$PY" -m pip download -q --only-binary=:all: --python-version "${tag:0:1}.${tag:1}" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform any -d "$dir" "${WEB_TIER[@]}" || return 1
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${tag:0:1}.${tag:1}" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform any -d "$dir" "${NO_DEPS[@]}" || return 1
    local name
    for name in "${LEAVE_OUT[@]}"; do find "$dir" -maxdepth 1 -iname "$name-[0-9]*.whl" -delete; done
    # Django's translations are 5 of its 7 MiB; the served API speaks English, and en's catalogue stays.
    "$PY" - "$dir"/django-[0-9]*.whl <<'EOF' || return 1
import sys, zipfile, os
path = sys.argv[1]
keep = lambda n: "/locale/" not in n or "/locale/en/" in n or not n.endswith((".mo", ".po"))
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".new", "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if keep(item.filename):
            dst.writestr(item, src.read(item.filename))
os.replace(path + ".new", path)
EOF
    local ranks
    ranks=$("$PY" -c 'from gpu_worker.loading.assets import gpt2_tiktoken_path as p; print(p())') || return 1
    mkdir -p "$dir/assets/whisper/assets" && cp "$ranks" "$dir/assets/whisper/assets/"
    du -sh "$dir"
}

prepare_redis() {
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download redis-server redis-tools libjemalloc2 liblzf1 libatomic1 libssl3 libsystemd0) || return 1
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/x"; done
    rm -rf .redis-bin && mkdir -p .redis-bin/bin .redis-bin/lib || return 1
    cp "$tmp/x/usr/bin/redis-check-rdb" .redis-bin/lib/redis-server  # Debian's redis-server is this binary
    local lib  # each soname as a plain file: links in a carried folder are best avoided
    for lib in libjemalloc.so.2 liblzf.so.1 libatomic.so.1 libssl.so.3 libcrypto.so.3 libsystemd.so.0; do
        cp -L "$(find "$tmp/x" -name "$lib" | head -n 1)" .redis-bin/lib/ || return 1
    done
    cat >.redis-bin/bin/redis-server <<'EOF'
#!/bin/sh
# Debian's redis-server with the libraries carried beside it (for this process only).
lib=$(dirname "$(readlink -f "$0")")/../lib
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$lib/redis-server" "$@"
EOF
    chmod +x .redis-bin/bin/redis-server
    rm -rf "$tmp"
    du -sh .redis-bin
}

if [ "$MODE" = prepare ]; then
    prepare_wheels && prepare_redis || { echo "prepare failed"; exit 1; }
    exit 0
fi
[ "$MODE" = run ] || { echo "usage: bash bench/serving_device.sh [run|prepare]"; exit 2; }

# --------------------------------------------------------------------------------------------------- run
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 RUVON_KEEP_STACK_LOGS=1
# The platforms' temporary folders (stack logs) go here, so a failure can show them and the end removes them.
TMPDIR=$(mktemp -d /tmp/ruvon-serving-XXXXXX) && export TMPDIR
WHEELS=$(wheel_dir)
[ "$DEVICE" = cpu ] && export CUDA_VISIBLE_DEVICES=""

echo "== install: $WHEELS into $SITE"
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "FAILED: pip install of $WHEELS (is it carried?)"; exit 1; }
cp -r "$WHEELS/assets/whisper" "$SITE/" || { echo "FAILED: $WHEELS/assets/whisper is missing"; exit 1; }
export PYTHONPATH=$SITE:$PWD PATH=$PWD/.redis-bin/bin:$PATH

echo "== preflight"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
redis-server --version || { echo "FAILED: redis-server does not run (ldd below)"; \
    LD_LIBRARY_PATH=.redis-bin/lib ldd .redis-bin/lib/redis-server; exit 1; }
"$PY" - "$DEVICE" <<'EOF' || exit 1
import importlib, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ruvon.settings")  # ninja reads settings on import
failed = []
for name in ("django", "daphne", "channels", "channels_redis", "ninja", "redis", "openai", "httpx", "celery",
             "matplotlib", "prometheus_client", "django_prometheus", "health_check", "dj_database_url",
             "torch", "triton", "transformers"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # every failure, not the first only
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
try:
    import django
    django.setup()
    import ruvon.asgi, bench.serving  # the web app's whole import graph, and the bench's
    from gpu_worker.loading.assets import gpt2_tiktoken_path
    gpt2_tiktoken_path()
except Exception as exc:
    failed.append(f"ruvon/bench: {type(exc).__name__}: {exc}")
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    failed.append("DEVICE=cuda but torch sees no GPU")
for line in failed:
    print("PREFLIGHT FAILED", line)
sys.exit(1 if failed else 0)
EOF
echo "preflight ok after ${SECONDS} s"

# One shape of one model: a bench/serving.py process bounded by the budget's rest and PER_PROCESS_S.
run_shape() {
    local model=$1 shape=$2 name=$3 left limit rates_var rate_args=(--rate 0)
    left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 45 ]; then echo "NOT RUN: $model $shape (${left} s left)"; return 0; fi
    limit=$((left < PER_PROCESS_S ? left : PER_PROCESS_S))
    rates_var=RATES_${model//-/_}
    for r in ${!rates_var:-}; do rate_args+=(--rate "$r"); done
    echo "== $model $shape (limit ${limit} s, rates burst ${!rates_var:-})"
    timeout -k 15 "$limit" "$PY" -m bench.serving --model "random:$model" --served-name "$model" \
        --requests "$REQUESTS" --new-tokens "$NEW_TOKENS" --min-prompt "$MIN_PROMPT" --max-prompt "$MAX_PROMPT" \
        --num-blocks "$NUM_BLOCKS" --database sqlite --shape "$shape" --name "$name-$shape" "${rate_args[@]}" \
        --web-processes "$WEB_PROCESSES"
    local rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "FAILED: $model $shape exit $rc (124: out of time)"
        tail -n 30 "$TMPDIR"/ruvon-*/*.log 2>/dev/null | tail -n 150
    fi
    rm -rf "${TMPDIR:?}"/ruvon-*
}

# Merge a model's per-shape JSON into the bench's own table, ratios and latency-vs-load plot.
merge() {
    "$PY" - "$OUT" "$1" <<'EOF'
import json, sys
from pathlib import Path
from bench.common import RESULTS, print_table
from bench.serving import SHAPES, add_ratios, p99_ttft_passes_1s, plot
out, name = Path(sys.argv[1]), sys.argv[2]
parts = [json.loads(p.read_text()) for s in SHAPES if (p := RESULTS / f"{name}-{s}.json").exists()]
if not parts:
    sys.exit(f"{name}: no shape finished")
rows = [r for part in parts for r in part["rows"]]
add_ratios(rows)
first = parts[0]
print(f"\n{name}: {first['args']['model']} (RANDOM weights), {first['args']['requests']} requests, "
      f"prompts {first['args']['min_prompt']}-{first['args']['max_prompt']} tokens, "
      f"{first['args']['new_tokens']} new tokens, commit {first['commit']}, on {first.get('cuda') or 'cpu'}")
print_table([{k: v for k, v in r.items() if k not in ("per_request", "problems", "usage")} for r in rows])
passes = p99_ttft_passes_1s(rows)
print("lowest rate with p99 TTFT > 1 s:", passes)
problems = [p for part in parts for p in part["problems"]]
for p in problems:
    print("PROBLEM", p)
if any(r["rate"] != "burst" for r in rows):
    plot(rows, out / f"{name}.png")
# One file per model (the device returns at most 8): each part's header, then every row with its requests.
headers = [{k: v for k, v in part.items() if k not in ("rows", "problems")} for part in parts]
merged = {"weights": "RANDOM", "parts": headers, "rows": rows, "p99_ttft_over_1s_at": passes,
          "problems": problems}
(out / f"{name}.json").write_text(json.dumps(merged, separators=(",", ":"), default=str))
EOF
}

for model in $MODELS; do
    name=serving-$model
    rm -f bench/results/"$name"-*  # an earlier call's files stay on a warm machine: never merge them
    for shape in ${SHAPES:-offline embedded production}; do
        run_shape "$model" "$shape" "$name"
    done
    merge "$name" || echo "FAILED: merge of $name"
done
# The feature ladder through the whole stack (docs/parts/20, "What each feature adds"): one `ruvon showcase`
# per row, each adding one option to the row before, GPT-2 XL shape (RANDOM weights), SQLite. LADDER names the
# rows to run (default none), e.g. LADDER="plain batching graphs int8 spec lora"; LADDER_USERS (16),
# LADDER_REQUESTS (2 per user), LADDER_TOKENS (64). The reports go into one archive, $OUT/ladder.tgz.
declare -A RUNG=(
    [plain]="--max-num-seqs 1 --enforce-eager --quantization none --speculative none"
    [batching]="--enforce-eager --quantization none --speculative none"
    [graphs]="--quantization none --speculative none"
    [int8]="--quantization int8 --speculative none"
    [spec]="--quantization int8 --speculative ngram"
    [lora]="--quantization int8 --speculative ngram --adapter $TMPDIR/ladder-adapter"
)
# The lora row: a third of the requests on one random rank-16 adapter of the model's shape (speed only: random
# weights and a random adapter), registered through the adapter registry like any tenant's upload.
if [[ " ${LADDER:-} " == *" lora "* ]]; then
    "$PY" bench/lora.py --shape "${LADDER_MODEL:-gpt2-xl}" --write-adapter "$TMPDIR/ladder-adapter" || echo "FAILED: adapter"
fi
for rung in ${LADDER:-}; do
    left=$((BUDGET_S - SECONDS))
    if [ "$left" -lt 60 ]; then echo "NOT RUN: ladder $rung (${left} s left)"; continue; fi
    echo "== ladder $rung: ${RUNG[$rung]} (limit $left s)"
    read -ra rung_args <<<"${RUNG[$rung]}"
    timeout -k 15 "$left" "$PY" -m ruvon_cli showcase --model "random:${LADDER_MODEL:-gpt2-xl}" \
        --served-name "${LADDER_MODEL:-gpt2-xl}" --no-live --no-lora --database sqlite --users "${LADDER_USERS:-16}" \
        --requests-per-user "${LADDER_REQUESTS:-2}" --max-tokens "${LADDER_TOKENS:-64}" \
        --out "$TMPDIR/ladder/$rung" "${rung_args[@]}" >"$TMPDIR/ladder-$rung.txt" 2>&1
    echo "== ladder $rung: exit $? after ${SECONDS} s"
    grep -vE "it/s\]|Loading weights" "$TMPDIR/ladder-$rung.txt" | tail -n 25
    mkdir -p "$TMPDIR/ladder/$rung" && cp "$TMPDIR/ladder-$rung.txt" "$TMPDIR/ladder/$rung/output.txt"
done
[ -d "$TMPDIR/ladder" ] && tar -czf "$OUT/ladder.tgz" -C "$TMPDIR" ladder
rm -rf "$TMPDIR"
ls -la "$OUT"
echo "serving_device.sh done after ${SECONDS} s"

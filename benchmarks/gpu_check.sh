#!/usr/bin/env bash
# One command for a CUDA machine (issue 15): the gpu-marked tests, the cost table in fp32 and
# bf16-mixed, the batched probes (vmap) vs point by point, and ResNet-18 at CIFAR size (batch
# 128, 300 steps) with the three diagnostic callbacks at their defaults vs none; with 2+ devices
# also the DDP run on them. Prints one table at the end. Without a GPU it prints one line and
# exits 0.
#
# It installs nothing and needs no internet: it expects `python3` on PATH (or $PYTHON) to be an
# environment with CUDA torch, lightning, pytest and this project installed (`pip install -e .`
# done beforehand; `transformers` for the BERT row, which is skipped without it). The `.venv`
# built on the CPU development machine is x86-64 CPU torch and is not used. Run it from the
# repository root or anywhere: `bash benchmarks/gpu_check.sh`. Budget: under 8 minutes on one
# H100/H200-class device (each part has its own timeout, under 8 min in all; a part that fails or
# times out is reported in the table and the rest still runs). Not yet run on a GPU: the timeouts
# are estimates, and a part that times out prints what it measured so far.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

missing=""
for mod in torch lightning pytest; do
    "$PY" -c "import $mod" 2>/dev/null || missing="$missing $mod"
done
if [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks:$missing (install the project with its test extras first); nothing run"
    exit 0
fi
ndev="$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
if [ "$ndev" = "0" ]; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing run"
    exit 0
fi

OUT="$(mktemp -d)"
device="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
declare -a rows
run() {  # run NAME SECONDS CMD...: output to $OUT/NAME.txt, one status row
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    local rc=$?
    local status="ok"
    [ $rc -eq 124 ] && status="TIMEOUT after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (rc $rc)"
    rows+=("$(printf '%-34s %-22s %4ss' "$name" "$status" "$((SECONDS - t0))")")
    echo "== $name: $status" >&2
}

run "gpu tests" 90 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider -m gpu
run "cost table fp32" 80 "$PY" benchmarks/cost_table.py --device cuda --precision 32-true \
    --models mlp resnet13 resnet18 bert --repeats 2
run "cost table bf16-mixed" 80 "$PY" benchmarks/cost_table.py --device cuda \
    --precision bf16-mixed --models mlp resnet13 resnet18 bert --repeats 2
run "ResNet-18 defaults vs none" 105 "$PY" benchmarks/overhead_defaults.py --device cuda \
    --models resnet18 --batch 128 --steps 300 --repeats 2 --threads 4
run "batched probes" 45 "$PY" benchmarks/batched_probes.py --device cuda \
    --models mlp resnet13 --probes grid ics --repeats 3
if [ "$ndev" -ge 2 ]; then
    run "DDP ResNet-18, 2 GPUs" 75 "$PY" benchmarks/overhead_defaults.py --device cuda \
        --devices 2 --models resnet18 --batch 128 --steps 200 --repeats 1 --threads 4
fi

echo
echo "gpu_check on $device ($ndev device(s)), torch $("$PY" -c 'import torch; print(torch.__version__)')"
printf '%-34s %-22s %5s\n' "part" "status" "time"
for r in "${rows[@]}"; do echo "$r"; done
echo
echo "--- gpu tests";                 tail -n 3 "$OUT/gpu tests.txt"
echo "--- cost table fp32";           grep -v '^$' "$OUT/cost table fp32.txt" | tail -n 30
echo "--- cost table bf16-mixed";     grep -v '^$' "$OUT/cost table bf16-mixed.txt" | tail -n 30
echo "--- ResNet-18 defaults vs none"; tail -n 5 "$OUT/ResNet-18 defaults vs none.txt"
echo "--- batched probes";            grep -E 'batched/sequential|agreement' "$OUT/batched probes.txt"
if [ "$ndev" -ge 2 ]; then
    echo "--- DDP ResNet-18, 2 GPUs"; tail -n 4 "$OUT/DDP ResNet-18, 2 GPUs.txt"
fi
echo "(full logs in $OUT)"
exit 0

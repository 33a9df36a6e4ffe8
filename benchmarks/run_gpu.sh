#!/usr/bin/env bash
# Install hookloop and its plugins into PYTHON without a package index, then run the
# whole benchmark suite on one CUDA device; writes results.json, the PNG plots, the
# install log and summary.txt (GPU name first) to OUTDIR. Sized to finish within
# 5 minutes on one GPU, installation included (a time budget stops what does not fit,
# and says so).
#
#   benchmarks/run_gpu.sh OUTDIR
#
# Environment:
#   PYTHON                  the interpreter (default: .venv/bin/python if present, else python3)
#   HOOKLOOP_BENCH_WHEELS   folder of carried wheels (default: benchmarks/wheels), e.g. torchinfo
#                           and pytorch-ignite (benchmarks/fetch_wheels.sh fetches them)
#   HOOKLOOP_BENCH_INSTALL  auto (default: install what is not installed) | force | skip
#   HOOKLOOP_BENCH_BUDGET_S seconds for the whole script (default 290)
#   CUDA_VISIBLE_DEVICES    picks the card
# Rehearsal without a GPU (tests/test_gpu_rehearsal.py does exactly this, in a fresh venv):
#   HOOKLOOP_BENCH_DEVICE=cpu HOOKLOOP_BENCH_QUICK=1 benchmarks/run_gpu.sh /tmp/out
set -euo pipefail

out=${1:?usage: benchmarks/run_gpu.sh OUTDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
start=$(date +%s)
budget=${HOOKLOOP_BENCH_BUDGET_S:-290}
device=${HOOKLOOP_BENCH_DEVICE:-cuda}
mkdir -p "$out"
out=$(cd "$out" && pwd)

{
    echo "run_gpu.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
    if [[ "$device" == cuda* ]]; then
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /'
        else
            echo "GPU: nvidia-smi not found"
        fi
    fi
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], sys.executable, '| torch',
        torch.__version__, '| cuda available:', torch.cuda.is_available())"
} | tee "$out/summary.txt"

if [[ "$device" == cuda* ]]; then
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
        'torch ' + torch.__version__ + ' sees no CUDA device: install a CUDA build of torch')"
fi

# 1. install, no index: carried wheels, then hookloop and every plugin whose SDK is there
"$PYTHON" "$here/install_offline.py" 2>&1 | tee "$out/install.log" | tee -a "$out/summary.txt"
"$PYTHON" -c "import hookloop" || { echo "run_gpu.sh: hookloop is not importable after the install" >&2; exit 1; }

# 2. the suite, on what is left of the budget
left=$(( budget - ($(date +%s) - start) ))
args=(--device "$device" --out "$out" --budget-s "$left")
if [[ -n "${HOOKLOOP_BENCH_QUICK:-}" ]]; then args+=(--quick); fi
cd "$out"  # trackers and peers that write to relative paths write here
"$PYTHON" "$here/run_all.py" "${args[@]}" 2>"$out/progress.log" | tee -a "$out/summary.txt"
echo "run_gpu.sh: $(( $(date +%s) - start )) s in all (budget ${budget} s); results in $out" \
    | tee -a "$out/summary.txt"

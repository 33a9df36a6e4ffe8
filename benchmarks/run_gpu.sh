#!/usr/bin/env bash
# Run the whole benchmark suite on one CUDA device and write results.json and the PNG
# plots to OUTDIR. Takes under 5 minutes on one GPU.
#
#   benchmarks/run_gpu.sh OUTDIR
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3);
# CUDA_VISIBLE_DEVICES picks the card. For a smoke run without a GPU:
#   HOOKLOOP_BENCH_DEVICE=cpu HOOKLOOP_BENCH_QUICK=1 benchmarks/run_gpu.sh /tmp/out
set -euo pipefail

out=${1:?usage: benchmarks/run_gpu.sh OUTDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
device=${HOOKLOOP_BENCH_DEVICE:-cuda}
args=(--device "$device" --out "$out")
if [[ -n "${HOOKLOOP_BENCH_QUICK:-}" ]]; then args+=(--quick); fi

if [[ "$device" == cuda* ]]; then
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
        'torch ' + torch.__version__ + ' sees no CUDA device: install a CUDA build of torch')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
fi
mkdir -p "$out"
start=$(date +%s)
"$PYTHON" "$here/run_all.py" "${args[@]}" 2>"$out/progress.log" | tee "$out/summary.txt"
echo "run_gpu.sh: $(( $(date +%s) - start )) s; results in $out"

#!/usr/bin/env bash
# Download the wheels that run_gpu.sh carries to the lent GPU machine, whose python3 has
# no package index and lacks these SDKs, into benchmarks/wheels/ (git-ignored; name the
# folder in the device tool's `carry`). Pure-Python wheels only, no dependencies:
#   torchinfo       -> the summary plugin and the demo can be installed there
#   pytorch-ignite  -> the Ignite contenders can run there
# MLflow and W&B are left out: with their dependencies they do not fit the 64 MiB the
# tool carries (their plugins are then reported as left out). Add names as arguments.
#
#   benchmarks/fetch_wheels.sh [NAME==VERSION ...]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest=${HOOKLOOP_BENCH_WHEELS:-$here/wheels}
python=${PYTHON:-python3}
mkdir -p "$dest"
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then names=(torchinfo==1.8.0 pytorch-ignite==0.5.5); fi
"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d "$dest" "${names[@]}"
du -ch "$dest"/*.whl | tail -1 | sed 's/total$/in all (the device tool carries 64 MiB at most)/'

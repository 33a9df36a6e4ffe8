"""Rehearsal of the lent-GPU run on CPU: ``benchmarks/run_gpu.sh`` in a fresh venv with
no package index, holding only what the GPU machine holds.

The GPU machine has no package index; its ``python3`` holds torch, pluggy, numpy, tqdm,
safetensors, tensorboard, scikit-learn and matplotlib (and lightning), not mlflow,
wandb, torchinfo or pytorch-ignite, and not hookloop. This test builds such a Python
without network: ``python -m venv --without-pip`` plus a ``.pth`` file naming a folder
of symlinks to exactly those distributions (with their own dependencies, pip and
setuptools) in this project's venv. One wheel is carried (torchinfo, rebuilt from the
installed copy), as ``benchmarks/fetch_wheels.sh`` would fetch it. Then it runs
``run_gpu.sh`` with ``HOOKLOOP_BENCH_DEVICE=cpu HOOKLOOP_BENCH_QUICK=1`` and
``PIP_NO_INDEX=1``, and checks that hookloop and the plugins whose SDK is present were
installed into that venv (the summary plugin thanks to the carried wheel), that the
MLflow and W&B plugins were reported as left out, and that the results were written.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_MACHINE_HOLDS = ("torch", "pluggy", "numpy", "tqdm", "safetensors", "tensorboard", "scikit-learn",
                     "matplotlib", "pip", "setuptools", "wheel")
"""Distributions of the GPU machine's python3 that this rehearsal exposes (with their
dependencies); see /work/.library/device/KINDS.md."""
NOT_ON_GPU_MACHINE = ("mlflow", "mlflow-skinny", "mlflow-tracing", "wandb", "torchinfo", "pytorch-ignite",
                      "lightning", "pytorch-lightning")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(site: Path) -> list[metadata.Distribution]:
    """The allowed distributions of ``site`` and their (non-extra) dependencies, minus
    what the GPU machine lacks and hookloop's own distributions."""
    dists = {_norm(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}
    banned = {_norm(n) for n in NOT_ON_GPU_MACHINE}
    todo = [_norm(n) for n in GPU_MACHINE_HOLDS]
    seen: dict[str, metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        if name in seen or name in banned or name.startswith("hookloop") or name not in dists:
            continue
        seen[name] = dists[name]
        for req in dists[name].requires or []:
            if "extra ==" in req:
                continue
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if m:
                todo.append(_norm(m.group(1)))
    return list(seen.values())


def _symlink_farm(site: Path, farm: Path) -> list[str]:
    """Symlinks in ``farm`` to the top-level files and folders of the allowed
    distributions; returns their normalised names."""
    farm.mkdir()
    dists = _closure(site)
    for d in dists:
        tops = {Path(f).parts[0] for f in (d.files or []) if not str(f).startswith("..")}
        for top in tops:
            src = site / top
            if src.exists() and not (farm / top).exists() and not top.endswith(".pth"):
                (farm / top).symlink_to(src)
    return sorted(_norm(d.metadata["Name"]) for d in dists)


def _wheel_from_installed(dist_name: str, dest: Path) -> Path:
    """A py3-none-any wheel rebuilt from an installed pure-Python distribution (what
    ``benchmarks/fetch_wheels.sh`` would download)."""
    dist = metadata.distribution(dist_name)
    name, version = dist.metadata["Name"].replace("-", "_"), dist.version
    info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for f in dist.files or []:
        p = str(f)
        if p.startswith("..") or ".dist-info/" in p or p.endswith(".pyc"):
            continue
        files[p] = Path(dist.locate_file(f)).read_bytes()
    files[f"{info}/METADATA"] = (dist.read_text("METADATA") or "").encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: hookloop-rehearsal\nRoot-Is-Purelib: true\n" \
                             b"Tag: py3-none-any\n"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for p, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        writer.writerow([p, f"sha256={digest}", len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    files[f"{info}/RECORD"] = record.getvalue().encode()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


def _fresh_venv(tmp: Path) -> tuple[Path, list[str]]:
    """A venv without pip whose ``.pth`` exposes only the GPU machine's packages."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(python), "-c", code], check=True, capture_output=True,
                               text=True).stdout.strip())
    exposed = _symlink_farm(Path(sysconfig.get_paths()["purelib"]), tmp / "gpu-machine-site")
    (site / "gpu_machine.pth").write_text(str(tmp / "gpu-machine-site") + "\n")
    return python, exposed


def test_run_gpu_script_installs_offline_and_runs_in_a_fresh_venv(tmp_path: Path) -> None:
    """The exact lent-GPU path, on CPU: fresh venv, no index, carried wheel, run_gpu.sh."""
    if not (ROOT / ".venv").exists() and sys.prefix == sys.base_prefix:
        pytest.skip("needs the project's venv to expose torch from")
    t0 = time.perf_counter()
    python, exposed = _fresh_venv(tmp_path)
    assert "torch" in exposed and "pluggy" in exposed
    assert not {"mlflow", "wandb", "torchinfo", "pytorch-ignite"} & set(exposed)
    wheels = tmp_path / "wheels"
    _wheel_from_installed("torchinfo", wheels)
    probe = subprocess.run([str(python), "-c", "import torch, pluggy; import hookloop"], capture_output=True,
                           text=True, cwd=tmp_path)
    assert "No module named 'hookloop'" in probe.stderr, "the fresh venv must not see hookloop yet"

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"PYTHON": str(python), "HOOKLOOP_BENCH_DEVICE": "cpu", "HOOKLOOP_BENCH_QUICK": "1",
                "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "HOOKLOOP_BENCH_WHEELS": str(wheels),
                "PATH": f"{python.parent}:{env.get('PATH', '')}"})
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh"), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    progress = (out / "progress.log").read_text() if (out / "progress.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n{progress[-3000:]}"
    stdout = proc.stdout

    # installed into the fresh venv, without an index
    install = (out / "install.log").read_text()
    lines = install.splitlines()
    installed_line = next(line for line in lines if line.startswith("install_offline: installed:"))
    for dist in ("hookloop", "hookloop-checkpoint", "hookloop-earlystopping", "hookloop-freeze",
                 "hookloop-progress", "hookloop-tensorboard", "hookloop-summary", "hookloop-gradnorm",
                 "hookloop-demo"):
        assert re.search(rf"\b{dist}(,|$)", installed_line), (dist, installed_line)
    left = next(line for line in lines if line.startswith("install_offline: left out"))
    assert "hookloop-mlflow (needs mlflow" in left and "hookloop-wandb (needs wandb" in left, left
    assert "torchinfo" in install  # the carried wheel
    where = subprocess.run([str(python), "-c", "import hookloop, hookloop_summary, torchinfo; "
                            "print(hookloop.__file__); print(hookloop_summary.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert all(line.startswith(str(tmp_path / "venv")) for line in where.split()), where

    # the suite ran and wrote its results
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["device"] == "cpu" and results["quick"]
    assert {"workloads", "checkpoint", "trackers", "wholefit", "dispatch"} <= set(results)
    stack = results["stack"]
    assert {"checkpoint", "tensorboard", "summary"} <= set(stack["plugins"])
    assert stack["missing"]["mlflow"] == "not installed" and stack["missing"]["wandb"] == "not installed"
    names = {t["name"]: t for t in results["targets"]}
    assert "tiny MLP, hookloop no plugins over raw" in names
    assert names["CUDA, small CNN, full stack over hookloop no plugins"]["status"] == "NOT RUN"
    assert any(n.startswith("async checkpoint stall") for n in names)
    assert any(n.startswith("tiny MLP, trackers over no plugins") for n in names)
    assert all(t["status"] in ("met", "MISSED", "NOT RUN") for t in results["targets"])
    works = {w["name"] for w in results["workloads"]["workloads"]}
    assert {"noop", "mlp", "cnn"} <= works
    assert "cnn_compiled" in works or "cnn_compiled" in results["workloads"]["skipped_workloads"]
    mlp = next(w for w in results["workloads"]["workloads"] if w["name"] == "mlp")
    hook = next(r for r in mlp["rows"] if r["contender"] == "hookloop")
    assert {"median", "min", "max"} <= set(hook["us_per_step"])  # every figure with its spread
    assert {r["contender"] for r in results["wholefit"]["rows"]} >= {"raw", "hookloop", "hookloop full stack"}
    assert "ignite, comparable handlers" in results["wholefit"]["skipped"]
    assert (out / "overhead_per_step.png").stat().st_size > 0
    summary = (out / "summary.txt").read_text()
    assert "left out" in summary and "targets" in summary
    assert stdout.rstrip().splitlines()[-1].startswith("run_gpu.sh:")
    print(f"rehearsal: {elapsed:.0f} s")

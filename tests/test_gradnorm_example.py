"""The plugin author kit end to end: pip-install examples/hookloop-gradnorm into a fresh
virtual environment and enable it by name only.

Why this environment set-up: a venv made with ``--system-site-packages`` would see the
*base* interpreter's packages, which need not hold hookloop or torch, and installing
torch into a fresh venv takes far too long for a test. So the test creates a bare venv
(``--without-pip``, a fraction of a second) and drops a ``.pth`` file into it that adds
the current environment's site-packages with ``site.addsitedir`` (so editable installs
there keep working). The venv's own site-packages come first on ``sys.path``, so the
plugin pip installs there is the one found, even if the current environment had the
example installed too. Everything the current environment has is visible, which is
why the child reports which entry points it sees and where ``gradnorm`` comes from,
and the test asserts that the venv added exactly one plugin, ``gradnorm``, loaded from
the venv, and that the fit ran with exactly the two plugins it named.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hookloop-gradnorm"

CHILD = r'''
import importlib.metadata
import json
import sys

import torch
from hookloop import Loop
from hookloop.testing import tiny_data, tiny_model
from hookloop.tracking import Tracker


class Recording(Tracker):
    """A tracker whose backend keeps every metric record in a list."""

    tracker_name = "recording"
    hookloop_name = "recording"

    def __init__(self):
        super().__init__(log_hparams=False)
        self.records = []

    def _backend_metrics(self, metrics, step):
        self.records.append([step, dict(metrics)])


def fit(plugin):
    model = tiny_model()
    tracker = Recording()
    loop = Loop(model, torch.optim.SGD(model.parameters(), lr=0.1), tiny_data(64, 8),
                loss_fn=torch.nn.functional.cross_entropy, log_every_n_steps=4,
                plugins=[plugin, tracker], autoload=False)
    loop.fit(max_epochs=2)  # 8 batches an epoch: 16 steps
    return {
        "plugins": [name for name, _ in loop.pm.plugin_items()],
        "plugin_type": type(loop.get_plugin("gradnorm")).__module__,
        "before_step": loop.pm.plan()["on_before_optimizer_step"],
        "tracker_state": tracker.state,
        "records": tracker.records,
    }


# nothing imported the plugin: the loop finds it by its entry-point name
assert "hookloop_gradnorm" not in sys.modules
by_name = fit("gradnorm")
print(json.dumps({
    "entry_points": sorted(
        [ep.name, ep.dist.metadata["Name"] if ep.dist else "?"]
        for ep in importlib.metadata.entry_points(group="hookloop")
    ),
    "module_file": sys.modules["hookloop_gradnorm"].__file__,
    "by_name": by_name,
    "with_options": fit(("gradnorm", {"every_n_steps": 4})),
}))
'''


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _clean_env() -> dict[str, str]:
    """The environment without anything that selects plugins or redirects imports."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_", "HOOKLOOP_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _make_venv(where: Path, env: dict[str, str]) -> Path:
    """A bare venv that sees this environment's packages through a .pth file."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(where)], env, where.parent)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   env, where.parent).stdout.strip()
    outer = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    lines = [f"import site; site.addsitedir({path!r})" for path in outer]
    Path(purelib, "_outer_env.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return python


def test_installed_example_is_enabled_by_name_and_its_metric_reaches_a_tracker(
    tmp_path: Path,
) -> None:
    env = _clean_env()
    python = _make_venv(tmp_path / "venv", env)
    # build from a copy so that no build/ or *.egg-info lands in the repository
    source = tmp_path / "hookloop-gradnorm"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
          "--no-cache-dir", "--no-deps", "--no-build-isolation", "--ignore-installed", str(source)],
         env, tmp_path)

    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    out = _run([str(python), str(script)], env, tmp_path).stdout
    report = json.loads(out.strip().splitlines()[-1])

    # the plugin set is controlled: the venv adds exactly "gradnorm", from the venv
    outer = {ep.name for ep in importlib.metadata.entry_points(group="hookloop")} - {"gradnorm"}
    seen = {name: dist for name, dist in report["entry_points"]}
    assert seen.get("gradnorm") == "hookloop-gradnorm"
    assert set(seen) - outer == {"gradnorm"}
    venv = (tmp_path / "venv").resolve()
    assert Path(report["module_file"]).resolve().is_relative_to(venv)
    by_name = report["by_name"]
    assert by_name["plugin_type"] == "hookloop_gradnorm"
    assert sorted(by_name["plugins"]) == ["gradnorm", "recording"]
    assert by_name["before_step"] == ["gradnorm"]

    # the metric arrived at the tracker's backend, through on_log. Default options:
    # measured every 50 steps, i.e. at global step 0 only in this 16-step fit, so it is
    # reduced at the first log interval (step 4) and in the first epoch's means.
    assert by_name["tracker_state"] == "closed"
    records = by_name["records"]
    assert [step for step, m in records if "grad/norm" in m] == [4]
    assert [step for step, m in records if "grad/norm_epoch" in m] == [8]
    assert all(m.get("grad/norm", 1.0) > 0 for _, m in records)

    # options travel with the name: every 4 steps, so one value in every log interval
    records = report["with_options"]["records"]
    assert [step for step, m in records if "grad/norm" in m] == [4, 8, 12, 16]
    assert [step for step, m in records if "grad/norm_epoch" in m] == [8, 16]

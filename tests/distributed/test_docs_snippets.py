"""The single-node launch examples of docs/distributed.md run as written: every Python
block marked ``<!-- run-under-torchrun -->`` (or ``<!-- run-under-torchrun-sharded -->``,
the FSDP2 example) is extracted and run under torchrun with two CPU processes (gloo),
through ``worker_docs.py``. Multi-node commands are shown in the docs, not run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, torchrun

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
MARK = "<!-- run-under-torchrun -->"
SHARDED_MARK = "<!-- run-under-torchrun-sharded -->"


def snippets(mark: str = MARK) -> list[str]:
    """The Python blocks of the doc marked with ``mark``, in order."""
    text = DOC.read_text()
    found = re.findall(re.escape(mark) + r"\s*\n```python\n(.*?)\n```", text, re.DOTALL)
    assert len(found) == text.count(mark), f"a {mark} mark not followed by a python block"
    return found


@pytest.mark.parametrize("mark", [MARK, SHARDED_MARK])
def test_the_doc_marks_its_launch_example(mark: str) -> None:
    blocks = snippets(mark)
    assert blocks, f"no {mark} block in {DOC}"
    for code in blocks:
        compile(code, str(DOC), "exec")


def _ran_on_both_ranks(script: Path, out: Path) -> tuple[dict, dict]:
    """Run ``script`` under torchrun; both ranks trained to the same step, one process
    group was created and it was destroyed, the loop closed. Returns each rank's record."""
    run = torchrun("worker_docs.py", out, str(script))
    assert run.returncode == 0, run.output[-8000:]
    r0, r1 = run.results("docs")
    for rank, r in enumerate((r0, r1)):
        assert r["inits"] == 1 and not r["group_up_after"], r
        assert (r["rank"], r["world_size"], r["closed"]) == (rank, 2, True)
    assert r0["global_step"] == r1["global_step"] > 0
    return r0, r1


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("index", range(len(snippets())))
def test_a_marked_snippet_runs_under_torchrun(tmp_path: Path, index: int) -> None:
    script = tmp_path / f"snippet{index}.py"
    script.write_text(snippets()[index])
    out = tmp_path / "out"
    r0, r1 = _ran_on_both_ranks(script, out)  # the loop created the group, the with block destroyed it
    # rank 0 alone writes the checkpoints and the manifest
    assert r1["replaced"] == []
    assert any(p.startswith("checkpoints/") and p.endswith(".pt") for p in r0["replaced"])
    assert "checkpoints/checkpoints.json" in r0["replaced"]
    assert (out / "checkpoints" / "checkpoints.json").is_file()
    # the checkpoint resumes: it holds the run's last step
    from hookloop_checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoints")
    assert state["loop"]["global_step"] == r0["global_step"]
    assert len(state["rng"]) == 2  # every rank's RNG state, gathered
    # the rank-zero-only tracker wrote its event files
    assert list((out / "runs").rglob("events.out.tfevents.*"))


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("index", range(len(snippets(SHARDED_MARK))))
def test_a_marked_sharded_snippet_runs_under_torchrun(tmp_path: Path, index: int) -> None:
    script = tmp_path / f"sharded{index}.py"
    script.write_text(snippets(SHARDED_MARK)[index])
    out = tmp_path / "out"
    r0, r1 = _ran_on_both_ranks(script, out)  # the script created its group (fully_shard needs it)
    # one directory per checkpoint, a shard file from each rank, listed by rank 0
    manifest = json.loads((out / "checkpoints" / "checkpoints.json").read_text())
    assert manifest["checkpoints"] and all(e["sharded"] for e in manifest["checkpoints"])
    last = out / "checkpoints" / manifest["last"]
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "loop.pt"]
    assert "checkpoints/checkpoints.json" in r0["replaced"] and not any(
        p.endswith("checkpoints.json") for p in r1["replaced"])

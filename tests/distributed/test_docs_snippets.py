"""The single-node launch examples of docs/distributed.md run as written: every Python
block marked ``<!-- run-under-torchrun -->`` is extracted and run under torchrun with
two CPU processes (gloo), through ``worker_docs.py``. Multi-node commands are shown in
the docs, not run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _launch import TEST_TIMEOUT, torchrun

DOC = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"
MARK = "<!-- run-under-torchrun -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*\n```python\n(.*?)\n```", re.DOTALL)


def snippets() -> list[str]:
    """The marked Python blocks of the doc, in order."""
    text = DOC.read_text()
    found = BLOCK.findall(text)
    assert len(found) == text.count(MARK), "a run-under-torchrun mark not followed by a python block"
    return found


def test_the_doc_marks_its_launch_example() -> None:
    blocks = snippets()
    assert blocks, f"no {MARK} block in {DOC}"
    for code in blocks:
        compile(code, str(DOC), "exec")


@pytest.mark.distributed
@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("index", range(len(snippets())))
def test_a_marked_snippet_runs_under_torchrun(tmp_path: Path, index: int) -> None:
    script = tmp_path / f"snippet{index}.py"
    script.write_text(snippets()[index])
    out = tmp_path / "out"
    run = torchrun("worker_docs.py", out, str(script))
    assert run.returncode == 0, run.output[-8000:]
    r0, r1 = run.results("docs")
    for rank, r in enumerate((r0, r1)):
        # the loop created the process group, and the with block destroyed it
        assert r["inits"] == 1 and not r["group_up_after"], r
        assert (r["rank"], r["world_size"], r["closed"]) == (rank, 2, True)
    assert r0["global_step"] == r1["global_step"] > 0
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

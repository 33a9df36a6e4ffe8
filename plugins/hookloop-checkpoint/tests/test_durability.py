"""Durability: atomic writes, checksums, fallback to the previous checkpoint, loud
write errors, refused pickles, and real SIGKILLs in the middle of saving."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hookloop_checkpoint import (
    MANIFEST_NAME,
    Checkpoint,
    CheckpointNotFoundError,
    CheckpointWriteError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load,
    load_checkpoint,
)
from hookloop_checkpoint._io import file_digest

from hookloop.plugins import hookimpl
from hookloop.testing import run_plugin, tiny_loop, tmpfs_mount_prefix, unmount

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ckpt_testlib import WORKER


class Bomb:
    """Raises while being pickled: a real failure in the middle of serialisation."""

    def __reduce_ex__(self, protocol):
        raise RuntimeError("boom while serialising")


class BombAt:
    """Adds a Bomb to the checkpoint from the ``n``-th save on."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    @hookimpl
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.calls += 1
        if self.calls >= self.n:
            checkpoint["zz_bomb"] = Bomb()


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


@pytest.mark.parametrize("async_save", [False, True])
def test_exception_mid_serialisation_leaves_previous_intact(tmp_path: Path, async_save: bool) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/loss", top_k=1, save_last=False, filename="e{epoch}",
                      async_save=async_save)
    bomb = BombAt(2)
    loop = tiny_loop([ckpt, bomb])
    with pytest.raises(CheckpointWriteError) as info:
        loop.fit(max_epochs=3)
    assert "boom while serialising" in str(info.value) and "intact" in str(info.value)
    # the first checkpoint is byte-identical to what was written, and still the only one
    files = snapshot(tmp_path)
    assert set(files) == {"e0.pt", MANIFEST_NAME}
    entry = json.loads(files[MANIFEST_NAME])["checkpoints"][0]
    assert file_digest(tmp_path / "e0.pt") == (entry["files"]["e0.pt"]["size"],
                                               entry["files"]["e0.pt"]["sha256"])
    assert load_checkpoint(tmp_path)["loop"]["epoch"] == 0
    # the plugin forgot the failed checkpoint
    assert [e["name"] for e in ckpt.state_dict()["entries"]] == ["e0"]


def test_async_error_surfaces_at_fit_end(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, filename="e{epoch}", async_save=True, every_n_epochs=2)
    loop = tiny_loop([ckpt, BombAt(1)])
    with pytest.raises(CheckpointWriteError, match="boom"):
        loop.fit(max_epochs=2)  # the only save is the last epoch's: its error comes at fit end
    assert not [p for p in tmp_path.iterdir() if p.name != MANIFEST_NAME]


def test_async_fit_returns_durable(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path, monitor="val/loss", top_k=2, every_n_steps=3, async_save=True,
                      filename="s{step}")
    loop, rec = run_plugin(ckpt, max_epochs=3)
    saved = rec.of("on_checkpoint_saved")
    assert len(saved) == len(ckpt.stats) >= 9
    assert all(s.write_s is not None and s.nbytes > 0 for s in ckpt.stats)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    for e in manifest["checkpoints"]:
        for name, info in e["files"].items():
            assert file_digest(tmp_path / name) == (info["size"], info["sha256"])
    last = load_checkpoint(tmp_path)
    assert last["loop"]["global_step"] == loop.state.global_step
    for k, v in loop.module.state_dict().items():
        assert torch.equal(last["model"][k], v)


def _two_checkpoints(d: Path) -> None:
    run_plugin(Checkpoint(d, top_k=-1, filename="e{epoch}"), max_epochs=2)


def test_truncated_latest_falls_back_with_warning(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path)
    data = (tmp_path / "e1.pt").read_bytes()
    (tmp_path / "e1.pt").write_bytes(data[: len(data) // 2])  # a real truncated file
    with pytest.warns(RuntimeWarning, match="fell back to e0.pt"):
        ck = load_checkpoint(tmp_path)
    assert ck["loop"]["epoch"] == 0
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "e1.pt")
    # a resume through the plugin falls back too, and never starts from scratch
    loop = tiny_loop([Checkpoint(tmp_path, resume="latest", filename="r{epoch}")])
    with pytest.warns(RuntimeWarning, match="fell back"):
        loop.fit(max_epochs=2)
    assert (tmp_path / "r1.pt").exists() and not (tmp_path / "r0.pt").exists()


def test_flipped_byte_is_detected_by_checksum(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path)
    with open(tmp_path / "e1.pt", "r+b") as f:  # same size, one byte changed
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.warns(RuntimeWarning, match="SHA-256"):
        assert load_checkpoint(tmp_path)["loop"]["epoch"] == 0


def test_nothing_usable_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        load_checkpoint(tmp_path)
    _two_checkpoints(tmp_path)
    for name in ("e0.pt", "e1.pt"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointNotFoundError, match="unusable"):
        load_checkpoint(tmp_path)
    loop = tiny_loop([Checkpoint(tmp_path, resume="latest")])
    with pytest.raises(CheckpointNotFoundError):
        loop.fit(max_epochs=1)  # never a silent fresh start
    # a damaged manifest: the directory is scanned instead
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointNotFoundError):
            load_checkpoint(tmp_path)


def test_malicious_checkpoint_is_refused(tmp_path: Path) -> None:
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Evil()}, evil)
    with pytest.raises(UnsafeCheckpointError, match="pickle payload"):
        load_checkpoint(evil)
    with pytest.raises(UnsafeCheckpointError):
        load(evil, torch.nn.Linear(2, 2))
    # also when it poses as the newest checkpoint of a run, with a matching checksum
    d = tmp_path / "run"
    _two_checkpoints(d)
    shutil.copy(evil, d / "e1.pt")
    manifest = json.loads((d / MANIFEST_NAME).read_text())
    for e in manifest["checkpoints"]:
        if e["name"] == "e1":
            size, digest = file_digest(d / "e1.pt")
            e["files"]["e1.pt"] = {"size": size, "sha256": digest}
    (d / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(d)
    with pytest.raises(UnsafeCheckpointError):
        tiny_loop([Checkpoint(d, resume="latest")]).fit(max_epochs=3)
    assert not canary.exists()


def test_unwritable_directory_raises_and_keeps_previous(tmp_path: Path) -> None:
    """Non-root: a real read-only (0555) directory. Root ignores modes, so there a file
    in place of the directory makes the real mkdir/open calls fail."""
    d = tmp_path / "ck"
    _two_checkpoints(d)
    before = snapshot(d)
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            loop = tiny_loop([Checkpoint(d, top_k=-1, filename="n{epoch}")])
            with pytest.raises(CheckpointWriteError) as info:
                loop.fit(max_epochs=1)
            assert isinstance(info.value.__cause__, PermissionError)
        finally:
            d.chmod(0o755)
    else:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(CheckpointWriteError):
            tiny_loop([Checkpoint(blocker / "sub")]).fit(max_epochs=1)
    assert snapshot(d) == before


RO_SCRIPT = r"""
import errno, os, subprocess, sys
from hookloop.testing import tiny_loop
from hookloop_checkpoint import Checkpoint, CheckpointWriteError, load_checkpoint
import torch
mode, d = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=200", "tmpfs", d], check=True)
try:
    tiny_loop([Checkpoint(d, filename="first")]).fit(max_epochs=1)
    before = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}
    if mode == "ro":
        subprocess.run(["mount", "-o", "remount,ro", d], check=True)
    else:  # fill the file system, leaving a little room
        filler = os.path.join(d, "filler")
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 65536)
            except OSError:
                pass
        os.truncate(filler, os.path.getsize(filler) - 8192)
    big = torch.nn.Sequential(torch.nn.Linear(4, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3))
    try:
        tiny_loop([Checkpoint(d, top_k=1, filename="second")], model=big).fit(max_epochs=1)
    except CheckpointWriteError as exc:
        print(mode, "RAISED", type(exc.__cause__).__name__, errno.errorcode.get(exc.errno))
    after = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d) if n != "filler"}
    print(mode, "INTACT", after == before)
    print(mode, "LOADS", load_checkpoint(d)["checkpoint"]["name"])
finally:
    subprocess.run(["umount", d], check=False)
"""


@pytest.mark.parametrize(("mode", "err"), [("ro", "EROFS"), ("full", "ENOSPC")])
def test_read_only_and_full_file_system(tmp_path: Path, mode: str, err: str) -> None:
    """A real read-only mount (EROFS) and a real full tmpfs (ENOSPC): mounted directly
    as root, else in a private mount namespace (``unshare -rm``); a skip names what is
    missing. Always unmounted afterwards."""
    prefix = tmpfs_mount_prefix(tmp_path / "probe", "the read-only/full cases")
    d = tmp_path / mode
    d.mkdir()
    script = tmp_path / "ro.py"
    script.write_text(RO_SCRIPT)
    try:
        out = subprocess.run([*prefix, sys.executable, str(script), mode, str(d)],
                             capture_output=True, text=True, timeout=300)
    finally:
        unmount(d)
    assert not os.path.ismount(d)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{mode} RAISED OSError {err}" in out.stdout, out.stdout + out.stderr[-2000:]
    assert f"{mode} INTACT True" in out.stdout  # no new file, no temporary file left
    assert f"{mode} LOADS first" in out.stdout
    assert not any(d.iterdir())  # everything was on the tmpfs


def test_file_size_limit_is_a_loud_error(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes the kernel fail the write (EFBIG): a real write error that
    needs no privileges."""
    script = tmp_path / "fsize.py"
    script.write_text(
        "import resource, signal, sys\n"
        "from hookloop.testing import tiny_loop\n"
        "from hookloop_checkpoint import Checkpoint, CheckpointWriteError, load_checkpoint\n"
        "import torch\n"
        "d = sys.argv[1]\n"
        "tiny_loop([Checkpoint(d, filename='first')]).fit(max_epochs=1)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "big = torch.nn.Sequential(torch.nn.Linear(4, 512), torch.nn.ReLU(), torch.nn.Linear(512, 3))\n"
        "try:\n"
        "    tiny_loop([Checkpoint(d, filename='second')], model=big).fit(max_epochs=1)\n"
        "except CheckpointWriteError as exc:\n"
        "    print('RAISED', type(exc.__cause__).__name__, exc.errno)\n"
        "print('LOADS', load_checkpoint(d)['checkpoint']['name'])\n"
    )
    d = tmp_path / "ck"
    out = subprocess.run([sys.executable, str(script), str(d)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    import errno

    assert f"RAISED OSError {errno.EFBIG}" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "LOADS first" in out.stdout
    assert sorted(p.name for p in d.iterdir()) == ["checkpoints.json", "first.pt"]


def _check_killed_dir(d: Path) -> bool:
    """After a SIGKILL: the newest complete checkpoint loads, and every file with a final
    name is complete. Returns whether a temporary file was left (killed mid-write)."""
    names = os.listdir(d)
    tmp = [n for n in names if n.startswith(".")]
    finals = [n for n in names if not n.startswith(".")]
    for n in finals:
        if n.endswith(".pt"):
            torch.load(d / n, weights_only=True)  # complete, whatever the manifest says
    if MANIFEST_NAME in finals:
        manifest = json.loads((d / MANIFEST_NAME).read_text())
        newest = max(manifest["checkpoints"], key=lambda e: e["seq"])
        for name, info in newest["files"].items():
            assert file_digest(d / name) == (info["size"], info["sha256"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback needed: the newest is complete
            ck = load_checkpoint(d)
        assert ck["checkpoint"]["name"] == newest["name"]
        assert ck["loop"]["global_step"] == newest["step"]
    return bool(tmp)


def _kill_runs(tmp_path: Path, n: int, seed: int) -> None:
    out = subprocess.run([sys.executable, str(WORKER), "kill-harness", str(tmp_path), str(n)],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "KILL_SEED": str(seed)})
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(runs) == n and all(r["killed"] for r in runs)
    left_tmp = {r["dir"]: _check_killed_dir(Path(r["dir"])) for r in runs}
    with_manifest = sum((Path(r["dir"]) / MANIFEST_NAME).exists() for r in runs)
    assert with_manifest >= n // 2
    # the runs killed inside a write (by handshake) left their temporary file; the newest
    # complete checkpoint still loads (checked above)
    forced = [r["dir"] for r in runs if r["mid_write"]]
    assert forced and all(left_tmp[d] for d in forced), "a kill inside a write left no temporary file"
    assert all((Path(d) / MANIFEST_NAME).exists() for d in forced)  # the first save completed
    # a killed run resumes from its newest complete checkpoint
    last = next(Path(r["dir"]) for r in runs if (Path(r["dir"]) / MANIFEST_NAME).exists())
    from ckpt_testlib import make_loop

    loop = make_loop([Checkpoint(last, resume="latest", every_n_epochs=None, filename="{step}")], width=512)
    step0 = load_checkpoint(last)["loop"]["global_step"]
    loop.fit(max_steps=step0 + 2)
    assert loop.state.global_step == step0 + 2


def test_sigkill_during_saves(tmp_path: Path) -> None:
    _kill_runs(tmp_path, 30, seed=1)


@pytest.mark.slow
def test_sigkill_during_saves_stress(tmp_path: Path) -> None:
    _kill_runs(tmp_path, 100, seed=2)

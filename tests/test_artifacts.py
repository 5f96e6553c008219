"""Cache keys, manifests, atomic publish, stale temporaries, run locks, rank slicing."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket

import pytest

from astrolabe.artifacts import atomic
from astrolabe.artifacts.keys import cache_key
from astrolabe.artifacts.lock import RunLock, RunLockedError
from astrolabe.artifacts.manifest import (
    MANIFEST_NAME,
    OWNER_NAME,
    ArtifactError,
    ArtifactPublishError,
    ArtifactVerificationError,
    FileEntry,
    Manifest,
    verify,
)
from astrolabe.artifacts.ranks import rank_filename, rank_slice
from astrolabe.artifacts.stagedir import StageDir, clean_stale_tmp_dirs, find_current, list_iterations

# ----------------------------------------------------------------------------------------------
# cache keys


def test_cache_key_matches_reference_and_ignores_dict_order():
    cfg = {"lr": 1e-4, "sampler": {"steps": 4, "shift": 5.0}, "rewards": ("hpsv2", "motion")}
    ref_payload = {
        "code_version": "v1",
        "config": {"lr": 1e-4, "rewards": ["hpsv2", "motion"], "sampler": {"shift": 5.0, "steps": 4}},
        "inputs": ["abc", "def"],
        "stage": "rollout",
    }
    ref = hashlib.sha256(json.dumps(ref_payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert cache_key("rollout", cfg, ["abc", "def"], "v1") == ref
    reordered = {"sampler": {"shift": 5.0, "steps": 4}, "rewards": ["hpsv2", "motion"], "lr": 1e-4}
    assert cache_key("rollout", reordered, ["abc", "def"], "v1") == ref


def test_cache_key_sensitive_to_every_part():
    base = cache_key("score", {"reward": "hpsv2", "batch": 4}, ["k1"], "v1")
    variants = [
        cache_key("label_uncertainty", {"reward": "hpsv2", "batch": 4}, ["k1"], "v1"),
        cache_key("score", {"reward": "hpsv3", "batch": 4}, ["k1"], "v1"),
        cache_key("score", {"reward": "hpsv2", "batch": 4, "x": None}, ["k1"], "v1"),
        cache_key("score", {"reward": "hpsv2", "batch": 4}, ["k2"], "v1"),
        cache_key("score", {"reward": "hpsv2", "batch": 4}, ["k1"], "v2"),
    ]
    assert len({base, *variants}) == 6
    assert cache_key("s", {}, ["a", "b"], "v") != cache_key("s", {}, ["b", "a"], "v")


# ----------------------------------------------------------------------------------------------
# publish / manifest


def write_payload(d) -> dict[str, bytes]:
    files = {"a.bin": b"hello", "sub/b.json": b'{"x": 1}', "rewards-r001.npy": b"\x00" * 1000}
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return files


def test_publish_layout_files_and_verify(tmp_path):
    run = tmp_path / "runs" / "demo"
    sd = StageDir(run, "score", "0123456789abcdef", iteration=3)
    assert sd.path == run / "iter-0003" / "score" / "0123456789abcdef"
    assert not sd.is_complete()
    tmp = sd.begin()
    assert tmp.name == f".0123456789abcdef.tmp-{os.getpid()}"
    files = write_payload(tmp)
    assert not sd.path.exists()
    m = sd.publish(sd.manifest(inputs={"rollout": "aaaa"}, config={"reward": "hpsv2"}, seeds={"base": 7},
                               counts={"records": 3}, timings={"total": 1.5}, code_version="v1"))
    assert sd.is_complete() and not tmp.exists()
    assert sorted(os.listdir(sd.path)) == ["a.bin", MANIFEST_NAME, "rewards-r001.npy", "sub"]
    assert m.files == {
        rel: FileEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest()) for rel, data in files.items()
    }
    loaded = Manifest.load(sd.path)
    assert loaded == m and loaded.iteration == 3 and loaded.inputs == {"rollout": "aaaa"}
    assert loaded.host == socket.gethostname() and loaded.world_size == 1
    assert verify(sd.path) == m
    assert list_iterations(run) == [3]


def test_verify_detects_changes(tmp_path):
    sd = StageDir(tmp_path / "run", "rollout", "k1")
    assert sd.path == tmp_path / "run" / "rollout" / "k1"
    write_payload(sd.begin())
    sd.publish(sd.manifest())
    (sd.path / "a.bin").write_bytes(b"jello")  # same size, other content
    verify(sd.path, check_sha=False)  # sizes only: not detected
    with pytest.raises(ArtifactVerificationError, match="checksum changed: a.bin"):
        verify(sd.path)
    (sd.path / "sub" / "b.json").unlink()
    (sd.path / "extra.txt").write_text("x")
    with pytest.raises(ArtifactVerificationError, match="missing: sub/b.json.*not in manifest: extra.txt"):
        verify(sd.path, check_sha=False)


def test_is_complete_requires_matching_parseable_manifest(tmp_path):
    sd = StageDir(tmp_path / "run", "rollout", "k1")
    write_payload(sd.begin())
    sd.publish(sd.manifest())
    manifest = sd.path / MANIFEST_NAME
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "key": "other"}))
    assert not sd.is_complete()
    manifest.write_text("{not json")
    assert not sd.is_complete()
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        Manifest.load(sd.path)


def test_publish_rejects_wrong_manifest_and_double_publish(tmp_path):
    sd = StageDir(tmp_path / "run", "rollout", "k1")
    sd.begin()
    with pytest.raises(ArtifactError, match="StageDir.manifest"):
        sd.publish(Manifest(stage="rollout", key="k2"))
    sd.publish(sd.manifest())
    sd.begin()
    with pytest.raises(ArtifactError, match="already published"):
        sd.publish(sd.manifest())
    assert not sd.tmp_path.exists() and sd.is_complete()


@pytest.mark.parametrize("target", ["write_durable", "rename_dir"])
def test_disk_full_never_leaves_partial_artifact(tmp_path, monkeypatch, target):
    sd = StageDir(tmp_path / "run", "nft_update", "k1", iteration=0)
    write_payload(sd.begin())

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, target, no_space)
    with pytest.raises(ArtifactPublishError) as info:
        sd.publish(sd.manifest())
    msg = str(info.value)
    assert "no space left on device" in msg and str(sd.path) in msg and "free disk space" in msg
    assert not sd.path.exists() and not sd.tmp_path.exists()
    assert os.listdir(sd.root) == []
    assert find_current(sd.run_path, "nft_update", iteration=0) is None


def _exit_now() -> None:
    os._exit(0)


def dead_pid() -> int:
    p = mp.get_context("fork").Process(target=_exit_now)
    p.start()
    p.join()
    return p.pid


def test_begin_cleans_stale_tmp_dirs_of_dead_processes(tmp_path):
    sd = StageDir(tmp_path / "run", "rollout", "k1")
    sd.root.mkdir(parents=True)
    pid = dead_pid()
    stale = sd.root / f".k0.tmp-{pid}"
    stale.mkdir()
    (stale / "half.tar").write_bytes(b"x")
    live = sd.root / f".k0.tmp-{os.getppid()}"  # our parent is alive
    live.mkdir()
    other_host = sd.root / f".k0.tmp-{pid + 1}"
    other_host.mkdir()
    (other_host / OWNER_NAME).write_text(json.dumps({"pid": pid, "host": "elsewhere"}))
    sd.begin()
    assert not stale.exists() and live.exists() and other_host.exists() and sd.tmp_path.exists()
    assert clean_stale_tmp_dirs(sd.root) == []


def test_find_current_prefers_expected_then_newest(tmp_path):
    run = tmp_path / "run"
    assert find_current(run, "score", 1) is None
    for key in ("old", "new"):
        sd = StageDir(run, "score", key, iteration=1)
        sd.begin()
        sd.publish(sd.manifest(config={"reward": key}))
    StageDir(run, "score", "half", iteration=1).begin()  # an unpublished temporary is ignored
    cur = find_current(run, "score", 1, expected_key="old")
    assert cur is not None and cur.key == "old" and not cur.stale
    cur = find_current(run, "score", 1, expected_key="missing")
    assert cur is not None and cur.key == "new" and cur.stale and cur.manifest.config == {"reward": "new"}
    cur = find_current(run, "score", 1)
    assert cur is not None and cur.key == "new" and not cur.stale


# ----------------------------------------------------------------------------------------------
# the atomic writer


def test_write_text_and_json_replace_whole_files_and_leave_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"a": 1}, indent=2)
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text() == json.dumps({"a": 1}, indent=2)
    atomic.write_text(path, "second")
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["summary.json"]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "publish_file", no_space)  # the data is written, the rename fails
    with pytest.raises(OSError):
        atomic.write_text(path, "third")
    assert path.read_text() == "second" and os.listdir(tmp_path) == ["summary.json"]


def test_publish_dir_replaces_and_restores_on_failure(tmp_path, monkeypatch):
    final = tmp_path / "store"
    with atomic.atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with atomic.atomic_dir(final) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("new")
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["sub", "sub/b.txt"]
    assert os.listdir(tmp_path) == ["store"]  # no .tmp / .old sibling left

    real = atomic.rename_dir

    def fail_into_place(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(atomic, "rename_dir", fail_into_place)
    with pytest.raises(OSError), atomic.atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("lost")
    assert (final / "sub" / "b.txt").read_text() == "new"  # the old directory was moved back
    assert os.listdir(tmp_path) == ["store"]
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_dir(final):
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["store"] and (final / "sub" / "b.txt").is_file()


# ----------------------------------------------------------------------------------------------
# run lock


def _hold_lock(run_dir: str, conn) -> None:
    lock = RunLock(run_dir).acquire()
    conn.send(os.getpid())
    signal.pause()  # hold until killed
    lock.release()


def test_run_lock_exclusive_across_processes_and_released_on_death(tmp_path):
    run = tmp_path / "run"
    parent_conn, child_conn = mp.get_context("fork").Pipe()
    child = mp.get_context("fork").Process(target=_hold_lock, args=(str(run), child_conn))
    child.start()
    try:
        assert parent_conn.poll(30), "child did not take the lock"
        child_pid = parent_conn.recv()
        with pytest.raises(RunLockedError) as info:
            RunLock(run).acquire()
        msg = str(info.value)
        assert f"pid {child_pid}" in msg and socket.gethostname() in msg and "another run name" in msg
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no clean release: the kernel drops the flock
        child.join(10)
    with RunLock(run) as lock:
        assert lock.held and lock.holder()["pid"] == os.getpid()
        with pytest.raises(RunLockedError):  # a second open in the same process conflicts too
            RunLock(run).acquire()
    assert not lock.held
    RunLock(run).acquire().release()


# ----------------------------------------------------------------------------------------------
# distributed helpers


def test_rank_slice_partitions_in_order():
    assert [rank_slice(10, r, 3) for r in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    assert [len(rank_slice(2, r, 4)) for r in range(4)] == [1, 1, 0, 0]
    for n in range(0, 13):
        for w in range(1, 6):
            items = [i for r in range(w) for i in rank_slice(n, r, w)]
            assert items == list(range(n))
            sizes = [len(rank_slice(n, r, w)) for r in range(w)]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank must be in"):
        rank_slice(4, 2, 2)
    assert rank_filename("rewards", 2, ".npy") == "rewards-r002.npy"

"""Shared fixtures of the end-to-end pipeline tests (``test_pipeline_resume.py``, ``test_pipeline_inputs.py``).

One *reference run* (the tiny config made smaller, :data:`SMALL_OVERRIDES`, 2 iterations) is trained once
per pytest process, in-process with the local engine, and memoised here (a plain module global, so both
test files share it). Tests never modify it: they copy it with :func:`copy_run` (a ``shutil.copytree``
under another run name, with its own MLflow run unless asked otherwise) and break / resume the copy.
All runs of a session live under one ``runs_root`` and log to one sqlite MLflow store.

Subprocesses (``astrolabe train ... --engine local``) run with one torch thread, like the test process
(tests/conftest.py), so that recomputed stages give the same floats as the reference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astrolabe.artifacts.manifest import MANIFEST_NAME, OWNER_NAME, Manifest
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.config import RunConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SMALL_OVERRIDES = [
    "pipeline.iterations=2",
    "pipeline.eval_every=1",
    "rl.epochs=1",
    "pipeline.eval_max_prompts=1",
    "pipeline.eval_seeds=[1000]",
    "rollout.prompts_per_iteration=2",
    "rl.optim.precision=fp32",
    "rl.optim.lr=1e-3",
    "rl.lora.rank=4",
    "rl.lora.alpha=4",
]
REF_NAME = "ref"
TMP_RE = re.compile(r"^\..+\.(tmp|old)-\d+$")

_CACHE: dict[str, Path] = {}


# ----------------------------------------------------------------------------------- locations


def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's pipeline directory: ``runs/`` (all runs) and ``mlflow.db``."""
    d = tmp_path_factory.getbasetemp() / "pipeline"
    (d / "runs").mkdir(parents=True, exist_ok=True)
    return d


def mlflow_uri(base: Path) -> str:
    return "sqlite:///" + str((base / "mlflow.db").resolve())  # absolute path: four slashes


def small_config(runs_root: Path, name: str, extra: list[str] | None = None) -> RunConfig:
    return load_config(TINY, [*SMALL_OVERRIDES, f"pipeline.runs_root={runs_root}", f"name={name}", *(extra or [])])


def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The completed reference run (trained on first use in this process, then reused)."""
    if REF_NAME not in _CACHE:
        from flows.run import train_run

        base = base_dir(tmp_path_factory)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", mlflow_uri(base))
            summary = train_run(small_config(base / "runs", REF_NAME))
        assert summary.computed_nodes == 12 and summary.cached_nodes == 0
        _CACHE[REF_NAME] = summary.run_path
    return _CACHE[REF_NAME]


# ----------------------------------------------------------------------------------- run directories


def copy_run(src: Path, name: str, keep_mlflow: bool = False) -> Path:
    """Copy a run directory to ``<runs_root>/<name>`` with its config renamed (no config change).

    Without ``keep_mlflow`` the copy starts its own MLflow run (the run id and logged-set are dropped).
    """
    dst = src.parent / name
    assert not dst.exists(), f"{dst} exists: use a unique run name per test"
    drop = {".lock", "run-summary.json"} | (set() if keep_mlflow else {"mlflow_run_id.txt", "tracking-logged.json"})
    shutil.copytree(src, dst, symlinks=True, ignore=lambda d, names: [n for n in names if Path(d) == src and n in drop])
    cfg = load_config(dst / "config.yaml", [f"name={name}"])
    (dst / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    return dst


def node_dir(run: Path, stage: str, iteration: int | None) -> Path:
    """The one complete output directory of a node (asserts there is exactly one)."""
    root = stage_root(run, stage, iteration)
    dirs = [p for p in root.iterdir()
            if not p.name.startswith(".") and ".damaged-" not in p.name and (p / MANIFEST_NAME).is_file()]
    assert len(dirs) == 1, f"{root}: expected one complete output, found {[p.name for p in dirs]}"
    return dirs[0]


def delete_nodes(run: Path, nodes: list[tuple[str, int | None]]) -> None:
    for stage, it in nodes:
        shutil.rmtree(stage_root(run, stage, it))


def manifests(run: Path) -> dict[tuple[str, int | None, str], Manifest]:
    """Every complete stage output of a run: ``(stage, iteration, key) -> manifest``."""
    out = {}
    for m_path in [*run.glob(f"*/*/{MANIFEST_NAME}"), *run.glob(f"iter-*/*/*/{MANIFEST_NAME}")]:
        if m_path.parent.name.startswith(".") or m_path.parts[-3].startswith("iter-") or m_path.parts[-3] == "latest":
            continue  # a temporary directory, a stage root directly under an iteration, a latest/ link
        if ".damaged-" in m_path.parent.name:
            continue  # a damaged output moved aside
        m = Manifest.load(m_path.parent)
        out[(m.stage, m.iteration, m.key)] = m
    return out


def created(run: Path) -> dict[tuple[str, int | None, str], str]:
    return {k: m.created for k, m in manifests(run).items()}


def temporary_dirs(run: Path) -> list[Path]:
    """``.<key>.tmp-<pid>`` / ``.<key>.old-<pid>`` directories anywhere in the run."""
    return [p for p in run.rglob(".*") if p.is_dir() and TMP_RE.match(p.name)]


def rollout_records(run: Path, iteration: int) -> list[dict]:
    from astrolabe.data.shards import list_shards, read_rollout_shards

    return list(read_rollout_shards(list_shards(node_dir(run, "rollout", iteration))))


# ----------------------------------------------------------------------------------- checkpoints


def checkpoint_tensors(nft_dir: Path) -> dict[str, object]:
    """``lora/adapter_model.safetensors`` and ``adapters/*.safetensors`` of an nft_update output, by file/key."""
    from safetensors.torch import load_file

    state = nft_dir / "state"
    files = [state / "lora" / "adapter_model.safetensors", *sorted((state / "adapters").glob("*.safetensors"))]
    out = {}
    for f in files:
        for k, v in load_file(f).items():
            out[f"{f.relative_to(state)}:{k}"] = v
    return out


def assert_same_checkpoint(a: Path, b: Path, atol: float = 1e-6) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert set(ta) == set(tb) and len(ta) > 0
    assert any("adapters/old.safetensors" in k for k in ta)
    worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    assert worst <= atol, f"checkpoints differ by {worst:.3g} (> {atol})"


# ----------------------------------------------------------------------------------- subprocesses


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "astrolabe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flows.cli"]


def cli_env(base: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri(base), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def start_train(run: Path, base: Path, log: Path, extra: list[str] | None = None) -> subprocess.Popen:
    """``astrolabe train <run>/config.yaml --engine local`` in its own process group, output to ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [*cli_command(), "train", str(run / "config.yaml"), "--engine", "local", *(extra or [])],
            cwd=REPO, env=cli_env(base), stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )


def wait_for_tmp_dir(proc: subprocess.Popen, run: Path, stage: str, iteration: int, timeout: float = 120.0) -> Path:
    """Poll for ``iter-K/<stage>/.<key>.tmp-<pid>/.owner.json`` of ``proc``; fails if it exits first."""
    root = stage_root(run, stage, iteration)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if root.is_dir():
            for p in root.iterdir():
                if p.name.endswith(f".tmp-{proc.pid}") and (p / OWNER_NAME).is_file():
                    return p
        if proc.poll() is not None:
            raise AssertionError(f"train exited ({proc.returncode}) before {stage}[{iteration}] started")
        time.sleep(0.02)
    raise AssertionError(f"{stage}[{iteration}] did not start within {timeout}s")


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=30)


def wait_for_lock_holder(proc: subprocess.Popen, run: Path, timeout: float = 120.0) -> dict:
    """Poll ``<run>/.lock`` until it names ``proc`` as holder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            info = json.loads((run / ".lock").read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if info.get("pid") == proc.pid:
            return info
        if proc.poll() is not None:
            raise AssertionError(f"train exited ({proc.returncode}) before taking the run lock")
        time.sleep(0.02)
    raise AssertionError(f"train did not take the lock within {timeout}s")


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture
def ref(tmp_path_factory):
    """The completed reference run (trained once per pytest process)."""
    return reference_run(tmp_path_factory)


@pytest.fixture
def base(tmp_path_factory, monkeypatch, ref):
    """The directory holding copies of the reference run, with MLflow pointed inside it."""
    b = base_dir(tmp_path_factory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri(b))
    return b

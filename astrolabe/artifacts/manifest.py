"""The manifest of a stage output and the integrity check of its files.

``manifest.json`` is written **last** into a stage's temporary directory (:mod:`astrolabe.artifacts.stagedir`),
so its presence under the final name means "complete". It records the key, inputs, config subset, seeds,
every file with size and sha256, counts, timings, the stage's namespaced metrics (``reward/<name>/mean``,
``loss/policy``, ``time/<stage>`` ...) and the files worth attaching to the tracking run (``reports``).
:func:`verify` recomputes sizes and checksums and names every difference (:func:`file_problems`).

Checksums stay cheap enough to check before every read: a file's sha256 is computed at most once per
process per version of the file. :data:`_HASHED` remembers it by ``(device, inode, size, mtime_ns,
ctime_ns)``: publishing seeds it (the rename keeps the inode), and any write or replacement changes
the stat key, so a damaged file is hashed again.
"""

from __future__ import annotations

import hashlib
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from astrolabe.configbase import Frozen

MANIFEST_NAME = "manifest.json"
OWNER_NAME = ".owner.json"  # inside a temporary directory: who is writing it


class ArtifactError(RuntimeError):
    """A stage artifact is missing, malformed or cannot be written."""


class ArtifactPublishError(ArtifactError):
    """Publishing failed; nothing was left under the final name."""


class ArtifactVerificationError(ArtifactError):
    """Files of a published artifact do not match its manifest."""


class ArtifactDamagedError(ArtifactVerificationError):
    """A stage's input is damaged (its files differ from its manifest); recompute it before reading it."""


def now_utc() -> str:
    """The current time as UTC ISO-8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class FileEntry(Frozen):
    size: int = Field(ge=0)
    sha256: str | None = None  # None when published with hash_files=False


class Manifest(Frozen):
    """What a stage directory holds and how it was made; written last, so its presence means complete."""

    schema_version: Literal[1] = 1
    stage: str
    key: str
    iteration: int | None = None
    inputs: dict[str, str] = Field(default_factory=dict, description="input stage -> its key")
    config: dict[str, Any] = Field(default_factory=dict, description="the config subset the stage reads")
    seeds: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict, description="relative posix path -> size, sha256")
    counts: dict[str, int] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict, description="seconds")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="namespaced, finite metrics of this output ('reward/<name>/mean', 'time/<stage>')",
    )
    reports: dict[str, str] = Field(
        default_factory=dict, description="relative path of a file -> the tracking-run folder it is attached under"
    )
    created: str = Field(default_factory=now_utc, description="UTC ISO-8601")
    instance: str = Field(
        "",
        description="'' for a normal publication; a forced rerun gets a fresh id, so what consumed the old output "
        "becomes stale (consumers' keys include it).",
    )
    rank: int = Field(0, ge=0)
    world_size: int = Field(1, ge=1)
    host: str = Field(default_factory=socket.gethostname)
    code_version: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Manifest:
        """Read ``<directory>/manifest.json``; :class:`ArtifactError` if missing or invalid."""
        path = Path(directory) / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise ArtifactError(
                f"{path} does not exist: the stage output is missing or incomplete; rerun the stage"
            ) from e
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise ArtifactError(f"{path} is not a valid manifest ({e.error_count()} errors): {e}") from e


# ----------------------------------------------------------------------------------- integrity


_HASHED: dict[tuple[int, int, int, int, int], str] = {}  # stat key -> sha256 of that version of a file


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk_bytes`` blocks (artifact files, checkpoints, prompt sets).

    Remembered for this version of the file (module docstring): hashing it again in this process is free.
    """
    before = os.stat(path)
    if (known := _HASHED.get(_stat_key(before))) is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    hexdigest = digest.hexdigest()
    if _stat_key(os.stat(path)) == _stat_key(before):  # not written to while we read it
        _HASHED[_stat_key(before)] = hexdigest
    return hexdigest


def list_files(directory: Path) -> list[str]:
    """Relative posix paths of all regular files under ``directory`` except the manifest and owner file."""
    out = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(directory).as_posix()
            if rel not in (MANIFEST_NAME, OWNER_NAME):
                out.append(rel)
    return sorted(out)


def compute_files(directory: str | os.PathLike[str], hash_files: bool = True) -> dict[str, FileEntry]:
    """``{relative path: FileEntry(size, sha256)}`` for the files of ``directory``."""
    d = Path(directory)
    return {
        rel: FileEntry(size=(d / rel).stat().st_size, sha256=sha256_file(d / rel) if hash_files else None)
        for rel in list_files(d)
    }


def file_problems(directory: str | os.PathLike[str], manifest: Manifest, check_sha: bool = True) -> list[str]:
    """Every difference between ``directory``'s files and ``manifest.files`` (sizes, and sha256 unless
    ``check_sha=False``): ``missing: <file>``, ``not in manifest: ...``, ``size changed: ...``, ``checksum
    changed: ...``; empty when the output is intact."""
    d = Path(directory)
    present = set(list_files(d))
    listed = set(manifest.files)
    problems = [f"missing: {p}" for p in sorted(listed - present)]
    problems += [f"not in manifest: {p}" for p in sorted(present - listed)]
    for rel in sorted(listed & present):
        entry, path = manifest.files[rel], d / rel
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"size changed: {rel} ({size} bytes, manifest says {entry.size})")
        elif check_sha and entry.sha256 is not None and sha256_file(path) != entry.sha256:
            problems.append(f"checksum changed: {rel}")
    return problems


def verify(directory: str | os.PathLike[str], check_sha: bool = True) -> Manifest:
    """Recompute sizes (and sha256 unless ``check_sha=False``) and compare with the manifest.

    Raises :class:`ArtifactVerificationError` listing every missing, unexpected or changed file.
    """
    d = Path(directory)
    manifest = Manifest.load(d)
    problems = file_problems(d, manifest, check_sha)
    if problems:
        raise ArtifactVerificationError(
            f"{d} does not match its manifest: " + "; ".join(problems) + ". Delete the directory and rerun the stage."
        )
    return manifest

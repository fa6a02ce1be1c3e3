"""The versioned adapter checkpoint format, and atomic publishing into a registry folder.

A checkpoint is a folder holding `manifest.json` and `adapter.safetensors`. The manifest
carries `format_version`, the base-model fingerprint, the adapter kind and config, the
adapted layers, the tasks learned in order, the instruction-type table, the training
config, evaluation metrics and the sha256 of every other file. A registry is a folder of
versions `v0001-<task>/`, `v0002-<task>/`, ... plus a `latest` symlink; a version appears
there only once complete (written aside, fsynced, renamed). Loading verifies hashes and
refuses unknown format versions, other base models, corrupt files and manifests whose
fields have the wrong types (checked when the manifest is read). Only JSON and
safetensors are ever read: nothing is unpickled.

It does not know how tensors map onto a model (see `smolora/model.py`) or watch folders
(see `server/`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from smolora.adapters.config_dicts import config_from_dict, read_json_object
from smolora.adapters.instructions import EMBED_DIM

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "adapter.safetensors"
LATEST = "latest"
_VERSION_DIR = re.compile(r"^v(\d{4,})-([A-Za-z0-9_.-]+)$")
_FINGERPRINT_FULL_HASH_LIMIT = 512 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says why and what to do."""


class UnknownFormatError(CheckpointError):
    """The manifest's format_version is not one this code can read."""


class IntegrityError(CheckpointError):
    """A file is missing, extra, or its hash differs from the manifest."""


class BaseModelMismatchError(CheckpointError):
    """The checkpoint was trained on another base model."""


class ManifestError(IntegrityError):
    """A manifest field has the wrong type or value (the message names the field)."""


@dataclass
class CheckpointManifest:
    """Everything a checkpoint says about itself (`manifest.json`).

    Attributes:
        adapter_kind: "smolora", "lora", "moelora" or "dora".
        adapter_config: the adapter's config dict (e.g. `SMoLoRAConfig.to_dict()`).
        base_model: {"fingerprint": str, "name": str, ...} of the frozen base.
        layers: canonical names of the adapted layers.
        tasks: tasks learned, in training order.
        instruction_types: the instruction table (`InstructionTable.to_list()`).
        training: training config and provenance (free-form JSON).
        eval: evaluation metrics after this task (free-form JSON).
        version: registry version number (set by `publish_checkpoint`).
        created_at: ISO-8601 UTC time (set on save).
        files: file name -> sha256 (set on save).
        format_version: the format this manifest follows.
    """

    adapter_kind: str
    adapter_config: dict[str, Any]
    base_model: dict[str, Any]
    layers: list[str]
    tasks: list[str]
    instruction_types: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    version: int | None = None
    created_at: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_manifest_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointManifest:
        return config_from_dict(
            cls,
            _migrate(dict(data)),
            UnknownFormatError,
            f"manifest (format_version {FORMAT_VERSION})",
        )


def _check_manifest_fields(m: CheckpointManifest) -> None:
    """Every field's type (and the few required values), so that a malformed manifest is
    refused when it is read, never later by whoever uses the field.

    Raises:
        ManifestError: naming the field.
    """

    def bad(name: str, want: str, got: Any) -> ManifestError:
        shown = repr(got)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return ManifestError(f"manifest field {name!r} must be {want} (got {shown})")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(m.adapter_kind, str) or not m.adapter_kind:
        raise bad("adapter_kind", "a non-empty string", m.adapter_kind)
    for name in ("adapter_config", "base_model", "training", "eval"):
        value = getattr(m, name)
        if not isinstance(value, dict):
            raise bad(name, "a JSON object", value)
    fingerprint = m.base_model.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise bad("base_model.fingerprint", "a non-empty string", fingerprint)
    for name in ("layers", "tasks"):
        value = getattr(m, name)
        if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
            raise bad(name, "a list of non-empty strings", value)
    if not m.tasks:
        raise ManifestError("manifest field 'tasks' must name at least one learned task")
    if not isinstance(m.instruction_types, list):
        raise bad("instruction_types", "a list of instruction types", m.instruction_types)
    for i, entry in enumerate(m.instruction_types):
        where = f"instruction_types[{i}]"
        if not isinstance(entry, dict):
            raise bad(where, "a JSON object", entry)
        for key in ("name", "text", "task"):
            if not isinstance(entry.get(key), str) or not entry.get(key):
                raise bad(f"{where}.{key}", "a non-empty string", entry.get(key))
        emb = entry.get("embedding")
        if (
            not isinstance(emb, list)
            or len(emb) != EMBED_DIM
            or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in emb
            )
        ):
            raise bad(f"{where}.embedding", f"a list of {EMBED_DIM} finite numbers", emb)
    if m.version is not None and (not is_int(m.version) or m.version < 1):
        raise bad("version", "a positive integer or null", m.version)
    if m.created_at is not None and not isinstance(m.created_at, str):
        raise bad("created_at", "a string or null", m.created_at)
    if not isinstance(m.files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in m.files.items()
    ):
        raise bad("files", "an object of file name -> sha256 string", m.files)
    if not is_int(m.format_version):
        raise bad("format_version", "an integer", m.format_version)


# Migrations from older format versions: version -> function producing the next version.
# Version 1 is the first released format, so there is nothing to migrate yet.
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    v = data.get("format_version")
    if not isinstance(v, int):
        raise UnknownFormatError(f"manifest has no integer format_version (got {v!r})")
    while v < FORMAT_VERSION and v in _MIGRATIONS:
        data = _MIGRATIONS[v](data)
        v = data["format_version"]
    if v != FORMAT_VERSION:
        raise UnknownFormatError(
            f"checkpoint format_version {v} is not supported (this build reads {FORMAT_VERSION}); "
            "upgrade smolora-serve or re-export the checkpoint"
        )
    return data


def all_finite(t: Tensor) -> bool:
    """True when no element of `t` is NaN or infinite.

    A NaN or infinity in `t` always makes its sum NaN or infinite, so a finite sum proves
    every element finite in one vectorised pass without a temporary; an elementwise
    `isfinite` allocates a bool per element, the larger part of verifying a large
    checkpoint. Only a non-finite sum (a NaN or infinity, or finite elements whose sum
    overflows) needs the elementwise check.
    """
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(t.isfinite().all())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def base_model_fingerprint(model_dir: str | Path) -> str:
    """A stable identity of a base-model folder.

    sha256 over `config.json` and, for each `*.safetensors` weight file, its name, size and
    content (the full content up to 512 MiB; beyond that the safetensors header plus the
    first and last MiB, so multi-GB real checkpoints fingerprint in milliseconds).
    """
    root = Path(model_dir)
    h = hashlib.sha256()
    h.update((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        if size <= _FINGERPRINT_FULL_HASH_LIMIT:
            h.update(bytes.fromhex(sha256_file(f)))
        else:
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(header_len, 100 << 20)))
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    out_dir: str | Path, tensors: dict[str, Tensor], manifest: CheckpointManifest
) -> Path:
    """Write a checkpoint folder (tensors first, manifest with their hashes last), fsynced.

    Returns:
        The folder path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / TENSORS))
    _fsync_file(out / TENSORS)
    manifest.files = {TENSORS: sha256_file(out / TENSORS)}
    manifest.created_at = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    (out / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    _fsync_file(out / MANIFEST)
    _fsync_dir(out)
    return out


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    manifest: CheckpointManifest
    tensors: dict[str, Tensor]


def read_manifest(path: str | Path) -> CheckpointManifest:
    """Parse a checkpoint's manifest (no hash checks).

    Raises:
        IntegrityError: missing or unparsable manifest (`ManifestError`: a field of the
            wrong type or value).
        UnknownFormatError: an unsupported format_version.
    """
    p = Path(path) / MANIFEST
    try:
        data = read_json_object(
            p,
            IntegrityError,
            f"{path}: no {MANIFEST}; not a checkpoint folder, or still being written",
            "manifest ",
        )
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise IntegrityError(f"{p}: manifest is unreadable ({type(e).__name__})") from None
    except ValueError as e:  # e.g. an integer too long to parse
        if isinstance(e, CheckpointError):
            raise
        raise IntegrityError(f"{p}: manifest is not valid JSON ({e})") from None
    try:
        return CheckpointManifest.from_dict(data)
    except TypeError as e:
        raise IntegrityError(f"{p}: manifest is missing fields ({e})") from None
    except ManifestError as e:
        raise ManifestError(f"{p}: {e}") from None


def verify_checkpoint(
    path: str | Path, expected_fingerprint: str | None = None
) -> CheckpointManifest:
    """Check a checkpoint folder without loading tensors.

    Raises:
        IntegrityError, UnknownFormatError, BaseModelMismatchError: see class docs.
    """
    root = Path(path)
    manifest = read_manifest(root)
    if TENSORS not in manifest.files:
        raise IntegrityError(f"{root}: manifest lists no {TENSORS}")
    on_disk = {f.name for f in root.iterdir() if f.is_file() and f.name != MANIFEST}
    listed = set(manifest.files)
    if on_disk != listed:
        raise IntegrityError(
            f"{root}: files {sorted(on_disk)} differ from the manifest's {sorted(listed)}"
        )
    for name, digest in manifest.files.items():
        actual = sha256_file(root / name)
        if actual != digest:
            raise IntegrityError(
                f"{root / name}: sha256 {actual[:12]}… != manifest {digest[:12]}…; the file is "
                "corrupt or was modified"
            )
    if (
        expected_fingerprint is not None
        and manifest.base_model.get("fingerprint") != expected_fingerprint
    ):
        raise BaseModelMismatchError(
            f"{root}: trained on base model {manifest.base_model.get('name', '?')} "
            f"(fingerprint {str(manifest.base_model.get('fingerprint'))[:12]}…), "
            f"but the loaded base has fingerprint {expected_fingerprint[:12]}…"
        )
    return manifest


def load_checkpoint(path: str | Path, expected_fingerprint: str | None = None) -> Checkpoint:
    """Verify, then load a checkpoint's manifest and tensors (safetensors only)."""
    root = Path(path)
    manifest = verify_checkpoint(root, expected_fingerprint)
    try:
        tensors = load_file(str(root / TENSORS))
    except Exception as e:  # safetensors raises its own error types
        raise IntegrityError(f"{root / TENSORS}: not a readable safetensors file ({e})") from None
    return Checkpoint(root.resolve(), manifest, tensors)


@dataclass(frozen=True)
class RegistryEntry:
    """A complete version in a registry folder."""

    version: int
    task: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def list_versions(registry: str | Path) -> list[RegistryEntry]:
    """Complete versions (folders named vNNNN-<task> holding a manifest), oldest first."""
    root = Path(registry)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _VERSION_DIR.match(d.name)
        if m and d.is_dir() and not d.is_symlink() and (d / MANIFEST).is_file():
            out.append(RegistryEntry(int(m.group(1)), m.group(2), d))
    return sorted(out, key=lambda e: e.version)


def latest_version(registry: str | Path) -> RegistryEntry | None:
    """The version the `latest` pointer names, or the newest complete one."""
    root = Path(registry)
    versions = list_versions(root)
    link = root / LATEST
    if link.is_symlink():
        target = os.readlink(link)
        for e in versions:
            if e.name == target:
                return e
    return versions[-1] if versions else None


def _safe_task(task: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", task).strip("-.")
    return s or "task"


def publish_checkpoint(
    registry: str | Path, tensors: dict[str, Tensor], manifest: CheckpointManifest
) -> RegistryEntry:
    """Atomically add a new version to a registry and point `latest` at it.

    The version is written under a hidden temporary name, fsynced, renamed into place (a
    reader sees all of it or nothing), and then `latest` is swapped by an atomic rename.
    Concurrent publishers are serialised by a lock file (an advisory lock the kernel
    releases when its holder dies). Under that lock every hidden temporary left in the
    registry belongs to a publisher that died mid-publish (killed, or the machine lost
    power): they are removed before this one writes.

    Returns:
        The new entry.
    """
    root = Path(registry)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".publish.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in [*root.glob(".tmp-*"), *root.glob(".latest-*")]:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        existing = list_versions(root)
        version = (existing[-1].version + 1) if existing else 1
        manifest.version = version
        final = root / f"v{version:04d}-{_safe_task(manifest.tasks[-1])}"
        tmp = root / f".tmp-{uuid.uuid4().hex}"
        try:
            save_checkpoint(tmp, tensors, manifest)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(root)
        tmp_link = root / f".latest-{uuid.uuid4().hex}"
        os.symlink(final.name, tmp_link)
        os.replace(tmp_link, root / LATEST)
        _fsync_dir(root)
    return RegistryEntry(version, final.name.split("-", 1)[1], final)

"""The checkpoint manifest loader under malformed input (`adapters/checkpoint.py`): whatever a
manifest holds -- a field of the wrong type, a field missing, an unknown key, bytes that are not
JSON or not UTF-8 -- reading or verifying it raises the typed `CheckpointError` (or succeeds),
never another exception. A hypothesis suite, plus the cases the issue names."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smolora.adapters.checkpoint import (
    MANIFEST,
    CheckpointError,
    ManifestError,
    read_manifest,
    verify_checkpoint,
)
from tests.server.api.helpers import HashingEmbedder, instruction_types, publish_version

JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "adapter_kind",
    "adapter_config",
    "base_model",
    "layers",
    "tasks",
    "instruction_types",
    "training",
    "eval",
    "version",
    "created_at",
    "files",
    "format_version",
]
NESTED = ["name", "text", "task", "embedding"]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A valid published checkpoint and its manifest."""
    registry = tmp_path_factory.mktemp("fuzz-registry")
    entry = publish_version(registry, "vqa", instruction_types(HashingEmbedder(), ["vqa_short"]))
    yield entry.path, json.loads((entry.path / MANIFEST).read_text())


def _with_manifest(src: Path, manifest: bytes) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="manifest-fuzz-"))
    shutil.copytree(src, folder, dirs_exist_ok=True)
    (folder / MANIFEST).write_bytes(manifest)
    return folder


def _load(folder: Path) -> None:
    """Read and verify; only `CheckpointError` may come out."""
    try:
        read_manifest(folder)
        verify_checkpoint(folder)
    except CheckpointError:
        pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_malformed_manifest_raises_only_the_typed_error(
    good: tuple[Path, dict[str, Any]], data: st.DataObject
) -> None:
    src, manifest = good
    m = json.loads(json.dumps(manifest))
    edits = data.draw(st.integers(min_value=1, max_value=3))
    for _ in range(edits):
        action = data.draw(st.sampled_from(["set", "delete", "nested", "extra"]))
        if action == "set":
            m[data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
        elif action == "delete":
            m.pop(data.draw(st.sampled_from(FIELDS)), None)
        elif action == "nested" and isinstance(m.get("instruction_types"), list):
            if m["instruction_types"] and isinstance(m["instruction_types"][0], dict):
                m["instruction_types"][0][data.draw(st.sampled_from(NESTED))] = data.draw(JSON)
        else:
            m[data.draw(st.text(min_size=1, max_size=8))] = data.draw(JSON)
    _load(_with_manifest(src, json.dumps(m).encode()))


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_manifest_bytes_that_are_not_a_json_object_raise_the_typed_error(
    good: tuple[Path, dict[str, Any]], raw: bytes
) -> None:
    _load(_with_manifest(good[0], raw))


def test_deep_or_huge_json_raises_the_typed_error(good: tuple[Path, dict[str, Any]]) -> None:
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"format_version": ' + b"9" * 5000 + b"}"):
        folder = _with_manifest(good[0], raw)
        with pytest.raises(CheckpointError):
            read_manifest(folder)
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    "field,value,named",
    [
        ("tasks", "vqa", "tasks"),
        ("adapter_config", None, "adapter_config"),
        ("layers", ["ok", 3], "layers"),
        ("base_model", {"fingerprint": 7}, "base_model.fingerprint"),
        ("instruction_types", ["vqa_short"], "instruction_types[0]"),
        ("instruction_types", [{"name": "a", "text": "b", "task": "c"}], "embedding"),
        (
            "instruction_types",
            [{"name": "a", "text": "b", "task": "c", "embedding": [0.0] * 3}],
            "embedding",
        ),
        (
            "instruction_types",
            [{"name": 5, "text": "b", "task": "c", "embedding": [0.0] * 384}],
            "instruction_types[0].name",
        ),
        ("files", {"adapter.safetensors": 1}, "files"),
        ("version", "2", "version"),
        ("format_version", True, "format_version"),
    ],
)
def test_wrong_field_types_are_refused_when_read(
    good: tuple[Path, dict[str, Any]], field: str, value: Any, named: str
) -> None:
    src, manifest = good
    folder = _with_manifest(src, json.dumps({**manifest, field: value}).encode())
    try:
        with pytest.raises(ManifestError) as e:
            read_manifest(folder)
        assert named in str(e.value)
    finally:
        shutil.rmtree(folder)

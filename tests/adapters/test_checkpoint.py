"""The checkpoint contract: round trip, integrity, format versions, atomic publishing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from smolora.adapters import checkpoint as ck
from smolora.adapters.smolora import RoutingContext
from tests.adapters.helpers import adapted_tiny, chat_prompt, shape_image
from tests.fixtures.make_checkpoint_fixtures import fixture_tensors

FIXTURES = Path(__file__).parents[1] / "fixtures" / "checkpoints"


def manifest_for(smodel, model_dir: Path, task: str = "colours") -> ck.CheckpointManifest:
    return ck.CheckpointManifest(
        adapter_kind="smolora",
        adapter_config=smodel.config.to_dict(),
        base_model={"fingerprint": ck.base_model_fingerprint(model_dir), "name": "tiny"},
        layers=list(smodel.layers),
        tasks=[task],
    )


def test_save_load_gives_identical_logits(tiny_model_dir, tmp_path) -> None:
    a, processor = adapted_tiny(tiny_model_dir, seed=1)
    b, _ = adapted_tiny(tiny_model_dir, seed=2)
    fp = ck.base_model_fingerprint(tiny_model_dir)
    ck.save_checkpoint(tmp_path / "c", a.adapter_state_dict(), manifest_for(a, tiny_model_dir))
    loaded = ck.load_checkpoint(tmp_path / "c", expected_fingerprint=fp)
    b.load_adapter_state_dict(loaded.tensors)
    inputs = processor(
        images=[shape_image((200, 0, 0))],
        text=[chat_prompt(processor, "What colour?")],
        return_tensors="pt",
    )
    u = torch.randn(1, 384)
    outs = []
    for m in (a, b):
        with torch.no_grad(), m.routing(RoutingContext(u)):
            outs.append(m.model(**inputs).logits)
    assert torch.equal(outs[0], outs[1])
    assert loaded.manifest.layers == list(a.layers)
    assert ck.verify_checkpoint(tmp_path / "c").files.keys() == {"adapter.safetensors"}


@pytest.fixture
def saved(tmp_path) -> Path:
    shutil.copytree(FIXTURES / "format_v1", tmp_path / "c")
    return tmp_path / "c"


def test_format_v1_fixture_loads() -> None:
    loaded = ck.load_checkpoint(FIXTURES / "format_v1")
    assert loaded.manifest.format_version == 1
    assert loaded.manifest.tasks == ["fixture_task"]
    for k, v in fixture_tensors().items():
        assert torch.equal(loaded.tensors[k], v)


def test_flipped_byte_is_refused(saved: Path) -> None:
    data = bytearray((saved / ck.TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (saved / ck.TENSORS).write_bytes(bytes(data))
    with pytest.raises(ck.IntegrityError, match="sha256"):
        ck.load_checkpoint(saved)


def test_tampered_manifest_hash_and_extra_file_are_refused(saved: Path, tmp_path: Path) -> None:
    (saved / "evil.pkl").write_bytes(b"not allowed")
    with pytest.raises(ck.IntegrityError, match="differ from the manifest"):
        ck.verify_checkpoint(saved)
    (saved / "evil.pkl").unlink()
    (saved / ck.TENSORS).unlink()
    with pytest.raises(ck.IntegrityError):
        ck.verify_checkpoint(saved)


def test_unknown_format_version_is_refused(saved: Path) -> None:
    m = json.loads((saved / ck.MANIFEST).read_text())
    m["format_version"] = 99
    (saved / ck.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ck.UnknownFormatError, match="format_version 99"):
        ck.load_checkpoint(saved)


def test_garbage_manifest_is_refused(saved: Path) -> None:
    (saved / ck.MANIFEST).write_text("{not json")
    with pytest.raises(ck.IntegrityError, match="not valid JSON"):
        ck.load_checkpoint(saved)


def test_other_base_model_is_refused(saved: Path) -> None:
    with pytest.raises(ck.BaseModelMismatchError, match="fingerprint"):
        ck.load_checkpoint(saved, expected_fingerprint="f" * 64)


def test_fingerprint_is_stable_and_sensitive(tiny_model_dir, tmp_path) -> None:
    fp = ck.base_model_fingerprint(tiny_model_dir)
    assert fp == ck.base_model_fingerprint(tiny_model_dir)
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(cfg))
    assert ck.base_model_fingerprint(copy) != fp


def test_publish_is_atomic_and_moves_latest(tmp_path: Path) -> None:
    reg = tmp_path / "registry"
    tensors = fixture_tensors()
    (reg / ".tmp-crashed").mkdir(parents=True)  # a dead publisher's half-written version
    (reg / "v0007-broken").mkdir()  # a folder without manifest is not a version
    first = ck.publish_checkpoint(reg, tensors, ck.read_manifest(FIXTURES / "format_v1"))
    second_manifest = ck.read_manifest(FIXTURES / "format_v1")
    second_manifest.tasks = ["fixture_task", "text reading/2"]
    second = ck.publish_checkpoint(reg, tensors, second_manifest)
    assert (first.version, second.version) == (1, 2)
    assert second.path.name == "v0002-text-reading-2"
    assert [e.version for e in ck.list_versions(reg)] == [1, 2]
    assert ck.latest_version(reg) == second
    assert (reg / "latest").resolve() == second.path.resolve()
    assert ck.load_checkpoint(second.path).manifest.version == 2
    assert not [p for p in reg.iterdir() if p.name.startswith((".latest-", ".tmp-"))]

"""`serve` refuses, before any engine starts, a `--model` that is not a servable LLaVA folder
and a `--registry` that is not a readable folder: the real CLI as a subprocess exits with
status 2 and a message naming the folder and what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smolora.server.startup_checks import (
    StartupCheckError,
    check_model_folder,
    check_prompt_rendering,
    check_registry,
)
from tests.fixtures.hf_llava import TEMPLATES, build_hf_llava


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "smolora.server", "serve", "--port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert (
        "vLLM" not in proc.stderr and "starting the vLLM engine" not in proc.stderr
    )  # nothing of the engine ran


def _copy_without(src: Path, dst: Path, *names: str) -> Path:
    shutil.copytree(src, dst)
    for name in names:
        (dst / name).unlink()
    return dst


def test_missing_model_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    _refused(_serve("--model", str(missing), "--no-adapters"), f"--model {missing}: no such folder")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    _refused(
        _serve("--model", str(tmp_path), "--no-adapters"),
        f"--model {tmp_path}: not a model folder",
        "no config.json",
    )


def test_other_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    _refused(
        _serve("--model", str(tmp_path), "--no-adapters"),
        str(tmp_path),
        "model_type 'bert'",
        "not a LLaVA model",
    )


def test_folder_without_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = _copy_without(tiny_model_dir, tmp_path / "m", "tokenizer.json")
    _refused(_serve("--model", str(folder), "--no-adapters"), f"--model {folder}: no tokenizer")


def test_template_that_drops_images(tmp_path: Path) -> None:
    folder = build_hf_llava(tmp_path / "drops", template=TEMPLATES / "drops-images.jinja")
    _refused(
        _serve("--model", str(folder), "--no-adapters"),
        f"--model {folder}",
        "chat template",
        "cannot render an image request",
    )


def test_missing_registry(tmp_path: Path, tiny_model_dir: Path) -> None:
    registry = tmp_path / "no-such-registry"
    _refused(
        _serve("--model", str(tiny_model_dir), "--registry", str(registry)),
        f"--registry {registry}: no such folder",
    )


def test_initial_version_not_published(tmp_path: Path, tiny_model_dir: Path) -> None:
    _refused(
        _serve(
            "--model", str(tiny_model_dir), "--registry", str(tmp_path), "--initial-version", "7"
        ),
        f"--registry {tmp_path}",
        "--initial-version 7 is not published there (published: none)",
    )


# -- the checks in-process: what else they refuse, and that servable folders pass ----------------
def test_servable_folders_pass(tmp_path: Path, tiny_model_dir: Path) -> None:
    hf = build_hf_llava(tmp_path / "hf")
    for folder in (tiny_model_dir, hf):
        check_model_folder(folder)
        check_prompt_rendering(folder)
    check_registry(tmp_path, None)  # an existing empty registry is served once a version appears


@pytest.mark.parametrize(
    "case, needle",
    [
        ("file", "not a folder"),
        ("bad_json", "config.json cannot be read as JSON"),
        ("original_llava", "convert_llava_weights_to_hf"),
        ("no_vision_config", "no vision_config"),
        ("no_weights", "no weights"),
        (
            "missing_shard",
            "names weight shards that are missing: ['model-00002-of-00002.safetensors']",
        ),
    ],
)
def test_model_folder_refusals(
    tmp_path: Path, tiny_model_dir: Path, case: str, needle: str
) -> None:
    folder = _copy_without(tiny_model_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    if case == "file":
        folder = folder / "config.json"
    elif case == "bad_json":
        (folder / "config.json").write_text("{not json")
    elif case == "original_llava":
        (folder / "config.json").write_text(
            json.dumps({"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"]})
        )
    elif case == "no_vision_config":
        del config["vision_config"]
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "no_weights":
        (folder / "model.safetensors").unlink()
    elif case == "missing_shard":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        "a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors",
                    }
                }
            )
        )
    with pytest.raises(StartupCheckError) as err:
        check_model_folder(folder)
    assert str(err.value).startswith(f"--model {folder}: ") and needle in str(err.value)


def test_registry_that_is_a_file(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "registry.txt"
    not_a_folder.write_text("")
    with pytest.raises(StartupCheckError, match="not a folder"):
        check_registry(not_a_folder, None)

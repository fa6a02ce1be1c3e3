"""What `serve` checks before it starts anything slow: the model folder and the registry.

A model folder that is not a LLaVA model (missing, no `config.json`, another architecture,
no tokenizer, no weights, a chat template that cannot place an image) would otherwise start
the HTTP server and fail in the background, leaving a process that answers "not ready"
with a traceback as the reason. These checks run first and raise `StartupCheckError` with a
message that names the folder and what is wrong, so the CLI exits non-zero at once.

`check_model_folder` reads only files (`config.json`, file names, a shard index);
`check_prompt_rendering` loads the tokenizer and chat template as the server will (a second
or two; the renderer itself probes a one-image message); `check_registry` checks that the
checkpoint registry is a readable folder and that `--initial-version` is published there.

What it does not do: start vLLM, read weights, verify checkpoints (the engine does that
when it loads a version) or create folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from smolora.adapters.checkpoint import list_versions

#: `architectures` / `model_type` values of the Hugging Face LLaVA layout the engine serves.
LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"
LLAVA_MODEL_TYPE = "llava"


class StartupCheckError(ValueError):
    """A start-up input cannot be served; the message names it and says what to fix."""


def _fail(what: str, path: Path, problem: str) -> StartupCheckError:
    return StartupCheckError(f"{what} {path}: {problem}")


def _config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise _fail(
            "--model",
            path,
            "not a model folder: it has no config.json (expected a Hugging Face LLaVA "
            "folder, as written by save_pretrained: config.json, tokenizer, *.safetensors)",
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail("--model", path, f"config.json cannot be read as JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail("--model", path, "config.json is not a JSON object")
    return config


def _check_llava(path: Path, config: dict[str, Any]) -> None:
    architectures = config.get("architectures") or []
    model_type = config.get("model_type")
    if LLAVA_ARCHITECTURE not in architectures and model_type != LLAVA_MODEL_TYPE:
        hint = ""
        if model_type == "llava_llama" or "LlavaLlamaForCausalLM" in architectures:
            hint = (
                "; this is the original LLaVA repository's layout: convert it to the "
                "Hugging Face layout (transformers' convert_llava_weights_to_hf) first"
            )
        raise _fail(
            "--model",
            path,
            f"config.json describes model_type {model_type!r} / architectures "
            f"{architectures}, not a LLaVA model ({LLAVA_ARCHITECTURE}, model_type 'llava'){hint}",
        )
    missing = [k for k in ("vision_config", "text_config") if not isinstance(config.get(k), dict)]
    if missing:
        raise _fail(
            "--model",
            path,
            f"config.json has no {' or '.join(missing)} (a LLaVA config carries both)",
        )


def _check_tokenizer(path: Path) -> None:
    if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
        return
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return
    raise _fail(
        "--model",
        path,
        "no tokenizer: expected tokenizer.json, tokenizer.model, or vocab.json + merges.txt "
        "(save the tokenizer or processor into the folder with save_pretrained)",
    )


def _check_weights(path: Path) -> None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise _fail(
                    "--model", path, f"{index_name} is not a shard index ({type(e).__name__}: {e})"
                ) from None
            absent = sorted(s for s in shards if not (path / s).is_file())
            if absent:
                raise _fail(
                    "--model", path, f"{index_name} names weight shards that are missing: {absent}"
                )
            return
    if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
        return
    raise _fail(
        "--model",
        path,
        "no weights: expected model.safetensors (or *.safetensors shards with "
        "model.safetensors.index.json, or pytorch_model*.bin)",
    )


def check_model_folder(path: Path) -> None:
    """Refuse a `--model` path that is not a Hugging Face LLaVA folder the engine can load.

    Reads `config.json` and looks for the tokenizer and weight files by name.

    Args:
        path: the `--model` folder.

    Raises:
        StartupCheckError: missing, not a folder, no or unreadable `config.json`, not a LLaVA
            config, no tokenizer files, no weights (or a shard index naming missing shards).
    """
    if not path.exists():
        raise _fail("--model", path, "no such folder")
    if not path.is_dir():
        raise _fail("--model", path, "not a folder (pass the model folder, not a file in it)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise _fail("--model", path, "the folder cannot be read by this user")
    config = _config(path)
    _check_llava(path, config)
    _check_tokenizer(path)
    _check_weights(path)


def check_prompt_rendering(path: Path) -> None:
    """Load the folder's tokenizer and chat template as the server does (`PromptRenderer`, which
    renders a one-image probe message).

    Raises:
        StartupCheckError: the tokenizer does not load, or the chat template cannot render a
            one-image request with exactly one image placeholder (the message says why).
    """
    from smolora.server.prompt import PromptRenderer

    try:
        PromptRenderer.from_model_dir(path)  # probes a one-image message (ChatTemplateError)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the folder is not servable
        raise _fail(
            "--model",
            path,
            f"its tokenizer or chat template cannot be used ({type(e).__name__}: {e})",
        ) from None


def check_registry(path: Path, initial_version: int | None) -> None:
    """Refuse a `--registry` path that cannot be a checkpoint registry.

    An existing, empty folder is fine (the server waits for the first published version).

    Args:
        path: the `--registry` folder.
        initial_version: `--initial-version`, which must then be published there.

    Raises:
        StartupCheckError: missing, not a folder, not readable, or `initial_version` not published.
    """
    if not path.exists():
        raise _fail(
            "--registry",
            path,
            "no such folder (create it, or point --registry at the folder the trainer "
            "publishes into; an empty folder is served once a version appears)",
        )
    if not path.is_dir():
        raise _fail(
            "--registry", path, "not a folder (pass the registry folder holding v0001-<task>/ ...)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise _fail("--registry", path, "the folder cannot be read by this user")
    if initial_version is not None:
        published = [e.version for e in list_versions(path)]
        if initial_version not in published:
            raise _fail(
                "--registry",
                path,
                f"--initial-version {initial_version} is not published there "
                f"(published: {published or 'none'})",
            )

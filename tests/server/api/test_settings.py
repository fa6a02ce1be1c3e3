"""ServerSettings validation and the CLI's argument -> settings mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from smolora.server.cli import build_parser, settings_from_args
from smolora.server.settings import ServerSettings


def test_defaults_and_derived_name(tmp_path: Path) -> None:
    s = ServerSettings(model_dir=tmp_path / "tiny-llava", registry_dir=tmp_path / "reg")
    assert s.served_model_name == "tiny-llava" and s.api_keys == () and s.admin_api_key is None
    assert s.image_formats == ("PNG", "JPEG", "WEBP")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("served_model_name", "a@b", "must not contain '@'"),
        ("port", 70000, "port"),
        ("api_keys", ("",), "empty keys"),
        ("admin_api_key", "", "admin_api_key"),
        ("max_images_per_request", 0, "max_images_per_request"),
        ("snap_threshold", 1.5, "snap_threshold"),
        ("image_formats", ("TIFF",), "image_formats"),
        ("image_url_allowlist", ("http://x.com/a",), "host name"),
        ("watch_interval_s", 0, "watch_interval_s"),
        ("retry_after_s", 0, "retry_after_s"),
    ],
)
def test_invalid_settings_are_refused(
    tmp_path: Path, field: str, value: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ServerSettings(model_dir=tmp_path, registry_dir=tmp_path, **{field: value})


def test_cli_arguments_and_key_sources(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# inference keys\nsk-1\nsk-2\n")
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            str(tmp_path / "m"),
            "--registry",
            str(tmp_path / "r"),
            "--port",
            "0",
            "--api-key-file",
            str(keys),
            "--image-url-allow",
            "img.example.com",
            "--engine-option",
            "max_num_seqs=8",
            "--engine-option",
            "dtype=bfloat16",
            "--no-watch",
            "--trace-default",
        ]
    )
    s = settings_from_args(args, environ={"SMOLORA_ADMIN_API_KEY": "adm"})
    assert s.api_keys == ("sk-1", "sk-2") and s.admin_api_key == "adm"
    assert s.engine_options == {"max_num_seqs": 8, "dtype": "bfloat16"}
    assert (
        s.image_url_allowlist == ("img.example.com",) and not s.watch_registry and s.trace_default
    )
    s2 = settings_from_args(
        build_parser().parse_args(["serve", "--model", "m", "--registry", "r"]),
        environ={"SMOLORA_API_KEYS": "a, b"},
    )
    assert s2.api_keys == ("a", "b") and s2.admin_api_key is None

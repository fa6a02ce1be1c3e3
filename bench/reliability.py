"""Hostile input and fuzzing against the real server: counts what was tried and the server errors.

Builds the tiny model and one published SMoLoRA version (cached under `--workdir`), starts
`python -m smolora.server serve` on it with the limits `clients/bad_requests.py` assumes (API
key, 2 images, 200 KB / 256x256 per image, 2 MB bodies, n <= 4) plus remote images allowed
from `localhost`, then:

- `bad_inputs`: every case of `clients/bad_requests.py`'s table, and the hostile inputs below
  (lone surrogates in each text field, a 2 MB prompt, private/loopback/link-local image URLs,
  JSON nested 100k deep, bodies that are not UTF-8, odd request ids, n past the slots); a
  server error is any 5xx or no answer;
- `fuzz`: schemathesis over the server's OpenAPI schema (`tests/reliability/api_fuzz.py`,
  positive and negative cases per operation) and hypothesis's near-valid chat bodies
  (`tests/reliability/test_fuzz_request.py`'s strategy) posted to the live server.

It updates `bench/results/reliability.json`'s `bad_inputs` and `fuzz` keys (each with its
command; the top-level `command` lists every producer) and leaves the others as they are:
`soak` comes from `bench/soak_mixed.py`, `faults` from `bench/faults.py`. Run (about 3
minutes on 2 cores):

    .venv/bin/python bench/reliability.py [--max-examples 20] [--body-examples 200]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test-suite helpers below live in tests/

from smolora.clients.bad_requests import (  # noqa: E402
    API_KEY,
    AUTH,
    IMG,
    MODEL,
    probe_bad_requests,
    user_message,
)
from tests.e2e.conftest import ADMIN_KEY, RemoteServer, publish_smolora  # noqa: E402
from tests.reliability.api_fuzz import fuzz_openapi  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))  # bench/ holds scripts, not a package
from reliability_result import RESULT, write_sections  # noqa: E402

CHAT = "/v1/chat/completions"


def prepare(workdir: Path) -> tuple[Path, Path]:
    """The tiny model and a registry with one version (built once under `workdir`)."""
    from smolora.adapters.instructions import InstructionEncoder
    from smolora.adapters.tiny_llava import build_tiny_llava, get_preset

    model = workdir / "model"
    if not (model / "config.json").is_file():
        build_tiny_llava(get_preset("tiny"), model, seed=0)
    registry = workdir / "registry"
    if not registry.is_dir() or not any(registry.iterdir()):
        registry.mkdir(parents=True, exist_ok=True)
        publish_smolora(registry, model, InstructionEncoder(), "vqa", seed=1)
    return model, registry


def _surrogate_body(path: list[Any], body: dict[str, Any]) -> bytes:
    """`body` as JSON whose string at `path` gets a lone surrogate escape."""
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = node[path[-1]] + "\ud800"
    return json.dumps(body).encode()  # ensure_ascii: travels as the escape \\ud800


def hostile_cases() -> list[tuple[str, dict[str, Any]]]:
    """(name, request) pairs beyond `bad_requests.CASES`: `json`/`content`, optional `headers`."""
    ok = {"model": MODEL, "messages": [user_message("What is it?", [IMG])], "max_tokens": 2}
    cases: list[tuple[str, dict[str, Any]]] = []
    for name, path in [
        ("surrogate_text", ["messages", 0, "content", 1, "text"]),
        ("surrogate_model", ["model"]),
        ("surrogate_stop", ["stop"]),
        ("surrogate_instruction", ["smolora", "instruction"]),
        ("surrogate_user", ["user"]),
    ]:
        body = json.loads(json.dumps(ok))
        body.setdefault("stop", "x")
        body.setdefault("smolora", {"instruction": "Answer."})
        body.setdefault("user", "u")
        cases.append((name, {"content": _surrogate_body(path, body)}))
    cases.append(
        ("two_megabyte_prompt", {"json": {**ok, "messages": [user_message("word " * 400_000)]}})
    )
    for host in ("127.0.0.1", "localhost", "169.254.169.254", "10.0.0.1", "[::1]"):
        url = f"http://{host}/x.png"
        cases.append(
            (f"image_url_{host}", {"json": {**ok, "messages": [user_message("hi", [url])]}})
        )
    cases.append(("deep_json", {"content": b'{"a":' * 100_000 + b"1" + b"}" * 100_000}))
    cases.append(("not_utf8", {"content": b'{"model": "\xff\xfe", "messages": []}'}))
    cases.append(
        ("nan_temperature", {"content": json.dumps({**ok, "temperature": float("nan")}).encode()})
    )
    cases.append(
        (
            "huge_int_seed",
            {"content": json.dumps(ok).encode()[:-1] + b', "seed": ' + b"9" * 5000 + b"}"},
        )
    )
    cases.append(("n_past_slots", {"json": {**ok, "n": 100}}))
    for rid in ("x" * 10_000, "bad id\tline", "é".encode("latin-1")):
        cases.append(
            (f"request_id_{len(rid)}", {"json": ok, "headers": {**AUTH, "x-request-id": rid}})
        )
    cases.append(("empty_body", {"content": b""}))
    cases.append(("array_body", {"content": b"[]"}))
    return cases


def run_hostile(url: str) -> dict[str, Any]:
    table = probe_bad_requests(url)
    errors = list(table["five_xx"])
    extra = hostile_cases()
    with httpx.Client(base_url=url, timeout=120) as client:
        for name, req in extra:
            headers = {"Content-Type": "application/json", **req.get("headers", AUTH)}
            try:
                if "json" in req:
                    r = client.post(CHAT, json=req["json"], headers=headers)
                else:
                    r = client.post(CHAT, content=req["content"], headers=headers)
            except httpx.HTTPError as e:
                errors.append(f"{name}:{type(e).__name__}")
                continue
            if r.status_code >= 500:
                errors.append(f"{name}:{r.status_code}")
    return {
        "tried": table["cases"] + len(extra),
        "server_errors": len(errors),
        "errors": errors,
        "normal_request_ok_after": table["normal_request_ok_after"],
    }


def run_body_fuzz(url: str, examples: int) -> tuple[int, list[str]]:
    """hypothesis's near-valid chat bodies posted to the live server."""
    from hypothesis import HealthCheck, given, settings

    from tests.reliability.test_fuzz_request import BODY

    sent = 0
    errors: list[str] = []
    client = httpx.Client(base_url=url, timeout=120, headers=AUTH)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=BODY)
    def post(body: dict[str, Any]) -> None:
        nonlocal sent
        sent += 1
        try:
            r = client.post(CHAT, content=json.dumps(body, allow_nan=True))
        except httpx.HTTPError as e:
            errors.append(type(e).__name__)
            return
        if r.status_code >= 500:
            errors.append(f"{r.status_code}: {r.text[:200]}")

    post()
    client.close()
    return sent, errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-reliability")
    p.add_argument(
        "--max-examples", type=int, default=20, help="schemathesis cases per operation and mode"
    )
    p.add_argument("--body-examples", type=int, default=200, help="hypothesis chat bodies")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args(argv)
    command = " ".join(
        ["python bench/reliability.py", shlex.join(sys.argv[1:] if argv is None else argv)]
    ).strip()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, registry = prepare(args.workdir)
    work = args.workdir / "server"
    work.mkdir(exist_ok=True)
    (work / "api.keys").write_text(API_KEY + "\n")
    extra = [
        "--api-key-file",
        str(work / "api.keys"),
        "--engine-option",
        "max_model_len=256",
        "--engine-option",
        f"kv_cache_bytes={64 * 1024 * 1024}",
        "--max-images",
        "2",
        "--max-image-bytes",
        "200000",
        "--max-image-pixels",
        str(256 * 256),
        "--max-request-bytes",
        "2000000",
        "--max-n",
        "4",
        "--image-url-allow",
        "localhost",
        "--image-url-allow",
        "127.0.0.1",
        "--image-fetch-timeout",
        "5",
    ]
    t0 = time.perf_counter()
    with RemoteServer(work, model, registry, extra) as srv:
        bad = run_hostile(srv.url)
        print(f"bad inputs: {bad['tried']} tried, {bad['server_errors']} server errors", flush=True)
        report = fuzz_openapi(
            srv.url,
            args.max_examples,
            headers={"Authorization": f"Bearer {API_KEY}"},
            admin_headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        bodies, body_errors = run_body_fuzz(srv.url, args.body_examples)
        alive = httpx.get(srv.url + "/health", timeout=30).status_code == 200
    fuzz = {
        "cases": report.cases + bodies,
        "server_errors": report.server_errors + len(body_errors),
        "schemathesis_cases": report.cases,
        "hypothesis_bodies": bodies,
        "errors": (report.failures + body_errors)[:20],
        "server_alive_after": alive,
    }
    print(f"fuzz: {fuzz['cases']} cases, {fuzz['server_errors']} server errors", flush=True)
    write_sections(
        {
            "bad_inputs": {**bad, "command": command},
            "fuzz": {
                **fuzz,
                "seconds_with_server_start": round(time.perf_counter() - t0, 1),
                "command": command,
            },
        },
        args.out,
    )
    print(f"wrote {args.out}")
    return 0 if bad["server_errors"] == 0 and fuzz["server_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m smolora.clients ...`: chat, checkpoint admin and load generation over HTTP.

    chat IMAGE "question" [--instruction TEXT | --instruction-type NAME] [--version N] [--stream]
    models                      served model ids (name, name@N per resident version)
    versions                    registry and resident versions (admin key)
    load N [--activate] | activate N | rollback | unload N      (admin key)
    loadgen [--requests N --concurrency C --duration S --max-tokens T --output FILE]

`--base-url`, `--api-key` and `--admin-api-key` default to the variables
SMOLORA_BASE_URL, SMOLORA_API_KEY and SMOLORA_ADMIN_API_KEY (read when the CLI runs).
Every command talks to the server; none needs torch. Publishing a checkpoint folder into a
registry is a filesystem step of the training package: `python -m smolora.training publish`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai


def _client(args: argparse.Namespace) -> Any:
    from smolora.clients.client import SmoloraClient

    return SmoloraClient(args.base_url, api_key=args.api_key, admin_api_key=args.admin_api_key)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_chat(args: argparse.Namespace) -> int:
    from smolora.clients.client import ChatResult

    c = _client(args)
    kw = dict(
        instruction=args.instruction,
        instruction_type=args.instruction_type,
        version=args.version,
        trace=not args.no_trace,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    if args.stream:
        result: ChatResult | None = None
        for piece in c.stream_chat(args.image, args.question, **kw):
            if isinstance(piece, ChatResult):
                result = piece
            else:
                print(piece, end="", flush=True)
        print()
    else:
        result = c.chat(args.image, args.question, **kw)
        print(result.text)
    assert result is not None
    ins = result.instruction or {}
    print(
        f"-- {result.model} finish={result.finish_reason} usage={result.usage} "
        f"instruction={ins.get('source')}:{ins.get('type')} sim={ins.get('similarity')}",
        file=sys.stderr,
    )
    if result.trace and not args.no_trace:
        print("   layer                        VU  IF   w_vu  w_if", file=sys.stderr)
        for t in result.trace:
            experts = f"{t['vu_expert']:>2} {t['if_expert']:>3}"
            weights = f"{t['w_vu']:.2f}  {t['w_if']:.2f}"
            print(f"   {t['layer']:<28} {experts}  {weights}", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    print("\n".join(_client(args).models()))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    _print(_client(args).list_checkpoints())
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    c = _client(args)
    if args.command == "load":
        _print(c.load(args.version, activate=args.activate))
    elif args.command == "activate":
        _print(c.activate(args.version))
    elif args.command == "unload":
        _print(c.unload(args.version))
    else:
        _print(c.rollback())
    return 0


def cmd_loadgen(args: argparse.Namespace) -> int:
    from smolora.clients.loadgen import LoadgenConfig, run_load

    cfg = LoadgenConfig(
        base_url=args.base_url,
        api_key=args.api_key,
        model=args.model,
        num_requests=args.requests,
        concurrency=args.concurrency,
        max_duration_s=args.duration,
        max_tokens=args.max_tokens,
        image_size=args.image_size,
        seed=args.seed,
    )
    report = asyncio.run(run_load(cfg)).to_dict()
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    _print(report)
    return 0 if report["requests_ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m smolora.clients", description="smolora-serve client"
    )
    p.add_argument(
        "--base-url", default=os.environ.get("SMOLORA_BASE_URL", "http://127.0.0.1:8000")
    )
    p.add_argument("--api-key", default=os.environ.get("SMOLORA_API_KEY"))
    p.add_argument("--admin-api-key", default=os.environ.get("SMOLORA_ADMIN_API_KEY"))
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("chat", help="ask a question about an image")
    c.add_argument("image", help="image file (PNG, JPEG, WebP; others are re-encoded)")
    c.add_argument("question")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--instruction", help="instruction text to route by")
    g.add_argument("--instruction-type", help="known instruction type of the checkpoint")
    c.add_argument("--version", type=int, help="checkpoint version (default: the active one)")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--stream", action="store_true")
    c.add_argument("--no-trace", action="store_true", help="do not ask for the routing trace")
    c.set_defaults(func=cmd_chat)

    sub.add_parser("models", help="served model ids").set_defaults(func=cmd_models)
    sub.add_parser("versions", help="registry and resident versions (admin)").set_defaults(
        func=cmd_versions
    )
    for name, helptext in (
        ("load", "make a published version resident"),
        ("activate", "activate a version"),
        ("unload", "unload a resident version"),
    ):
        a = sub.add_parser(name, help=helptext + " (admin)")
        a.add_argument("version", type=int)
        if name == "load":
            a.add_argument("--activate", action="store_true")
        a.set_defaults(func=cmd_admin)
    sub.add_parser(
        "rollback", help="re-activate the previously active version (admin)"
    ).set_defaults(func=cmd_admin)

    lg = sub.add_parser("loadgen", help="load-test a local server")
    lg.add_argument("--model")
    lg.add_argument("--requests", type=int, default=32)
    lg.add_argument("--concurrency", type=int, default=4)
    lg.add_argument(
        "--duration", type=float, default=60.0, help="seconds after which no new request starts"
    )
    lg.add_argument("--max-tokens", type=int, default=16)
    lg.add_argument("--image-size", type=int, default=64)
    lg.add_argument("--seed", type=int, default=0)
    lg.add_argument("--output", help="also write the JSON report here")
    lg.set_defaults(func=cmd_loadgen)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from smolora.clients.client import SmoloraAPIError

    try:
        return int(args.func(args))
    except SmoloraAPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        print(f"error: HTTP {e.status_code}: {body.get('message', e.message)}", file=sys.stderr)
        return 1
    except (openai.APIConnectionError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

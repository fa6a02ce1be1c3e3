"""CPU seconds per process of our server (API process, vLLM engine core, worker) around two
loads of `bench/server.py`'s workload; prints tokens/s and the CPU seconds of each load.

    python bench/server_cpu.py routed                      # serve --registry (SMoLoRA)
    python bench/server_cpu.py base                        # serve --no-adapters
    python bench/server_cpu.py routed --engine-option 'cpu_overlap="auto"'

Extra arguments go to `serve`. A diagnostic for where a server's CPU time goes, not a
ratio benchmark: run it alone on an idle machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))  # bench/ holds scripts, not a package
import server as bench_server  # noqa: E402


def cpu_seconds(pid: int) -> dict[str, float]:
    """user + system CPU seconds of a process and its descendants, by 'pid:name'."""
    root = psutil.Process(pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[f"{proc.pid}:{proc.name()[:18]}"] = t.user + t.system
        except psutil.Error:
            pass
    return out


def main(argv: list[str]) -> int:
    mode, extra = argv[0], argv[1:]
    if mode not in ("routed", "base"):
        raise SystemExit("usage: server_cpu.py routed|base [serve args...]")
    cfg = bench_server.BenchConfig()
    work = Path(f"/tmp/smolora-server-cpu-{mode}")
    work.mkdir(parents=True, exist_ok=True)
    model_dir = bench_server.prepare_model(cfg)
    registry = bench_server.prepare_adapters(cfg, model_dir, work)[0] if mode == "routed" else None
    srv = bench_server.our_server(cfg, model_dir, work, registry)
    srv.cmd += extra
    srv.start(cfg.start_timeout_s)
    try:
        assert srv.proc is not None
        bench_server.load(cfg, srv.url, bench_server.API_KEY)  # warm-up
        for _ in range(2):
            before, t0 = cpu_seconds(srv.proc.pid), time.time()
            report = bench_server.load(cfg, srv.url, bench_server.API_KEY)
            wall, after = time.time() - t0, cpu_seconds(srv.proc.pid)
            used = {k: round(v - before.get(k, 0.0), 1) for k, v in after.items()}
            print(
                f"{mode} {extra}: {report.output_tokens_per_s:.0f} tok/s, "
                f"wall {wall:.1f} s, CPU s {used}",
                flush=True,
            )
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

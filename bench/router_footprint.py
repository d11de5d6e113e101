"""Router process footprint: start time to ready, RSS, and whether torch was loaded, for one or more trees.

    python -m pdserve.bench.router_footprint                       # this install
    python -m pdserve.bench.router_footprint --before /tmp/old     # plus a checkout of an older commit

``--before`` takes a source tree of a commit from before the one-package layout (router started with
``python -m deploy.cli router``, PYTHONPATH=tree); both are measured in the same run, interleaved, and the
ratios printed. The router is given two worker addresses nobody listens on: it starts, polls them and
stays up, which is all a footprint needs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

UNREACHABLE = ["--prefill", "127.0.0.1:9", "--decode", "127.0.0.1:9"]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _has_torch(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libtorch" in maps


def measure(cmd: list[str], env: dict[str, str], timeout_s: float = 120.0) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd="/")
    try:
        deadline = time.monotonic() + timeout_s
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line or line.startswith("PDSERVE_READY"):
                break
        if not line.startswith("PDSERVE_READY"):
            raise RuntimeError(f"router did not become ready: {' '.join(cmd)}")
        ready_s = time.perf_counter() - t0
        time.sleep(0.5)  # let the first load polls run
        return {"ready_s": ready_s, "rss_mib": _rss_mib(proc.pid), "torch_loaded": _has_torch(proc.pid)}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.router_footprint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="", help="source tree of an older commit (old layout) to compare with")
    p.add_argument("--repeat", type=int, default=5, help="starts per variant (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)

    variants: dict[str, tuple[list[str], dict[str, str]]] = {
        "now": ([sys.executable, "-m", "pdserve", "router", "--port", "0", *UNREACHABLE], dict(os.environ)),
    }
    if a.before:
        env = dict(os.environ, PYTHONPATH=str(Path(a.before).resolve()))
        variants["before"] = ([sys.executable, "-m", "deploy.cli", "router", "--port", "0", *UNREACHABLE], env)
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(a.repeat):
        for name, (cmd, env) in variants.items():
            runs[name].append(measure(cmd, env))
    result = {
        name: {
            "ready_s": statistics.median(r["ready_s"] for r in rs),
            "rss_mib": statistics.median(r["rss_mib"] for r in rs),
            "torch_loaded": any(r["torch_loaded"] for r in rs),
        }
        for name, rs in runs.items()
    }
    if "before" in result:
        result["ratio_now_over_before"] = {
            k: result["now"][k] / result["before"][k] for k in ("ready_s", "rss_mib")
        }
    if a.json:
        print(json.dumps(result))
        return 0
    for name in variants:
        r = result[name]
        print(f"{name:>7}: ready in {r['ready_s']:.2f} s, RSS {r['rss_mib']:.0f} MiB, torch loaded: {r['torch_loaded']}")
    if "before" in result:
        q = result["ratio_now_over_before"]
        print(f"  ratio now/before: start time {q['ready_s']:.2f}x, RSS {q['rss_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

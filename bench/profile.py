"""Where the app's replica spends its time under the benchmark's load: a py-spy profile of the
replica process, summed by part of the serving path (docs/performance.md).

    python -m bench.profile                      # concurrency 64, 30 s, the chart's CPU profile
    python -m bench.profile --concurrency 16 --seconds 60 --b-set engine.streamInterval=4

py-spy comes with ray[default]. It samples every thread of the replica; samples are attributed to
the innermost frame that belongs to a known part, so a vLLM call made from Serve's code counts as
vLLM's, and a Ray metrics call made from vLLM's statistics counts as metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from bench import loadgen, servers
from bench.run import PROMPTS
from tools import serve_local, tiny_model

# (part, substrings of a frame "function (path:line)"), the first that matches wins.
PARTS = [
    ("this app's own code", ["vllm_app.py"]),
    ("metrics", ["ray/util/metrics", "ray/serve/metrics", "vllm/v1/metrics", "prometheus_client",
                 "prometheus_fastapi_instrumentator"]),
    ("logging", ["logging/__init__", "ray/_private/utils.py"]),
    ("Serve's direct ingress and uvicorn", ["ray/serve/", "uvicorn/"]),
    ("vLLM's frontend, FastAPI, Starlette", ["vllm/entrypoints", "starlette/", "fastapi/", "pydantic/", "anyio/"]),
    ("vLLM's engine client", ["vllm/", "tokenizers", "transformers/", "zmq/", "msgspec/"]),
]
# A sample whose innermost Python frame is one of these is the event loop's own work in C (uvloop).
LOOP_FRAMES = ("Thread.run (threading.py", "._run_user_code_event_loop (")


def breakdown(collapsed: str) -> dict[str, int]:
    """Samples per part from py-spy's raw output (`thread;frame;...;frame count` per line)."""
    parts: collections.Counter = collections.Counter()
    for line in collapsed.splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        thread, *frames = stack.split(";")
        if "MainThread" in thread:
            part = "Ray's worker main thread"
        elif frames and any(frame in frames[-1] for frame in LOOP_FRAMES):
            part = "event loops in C (uvloop)"
        else:
            part = next((name for frame in reversed(frames) for name, keys in PARTS
                         if any(key in frame for key in keys)), "other")
        parts[part] += int(count)
    return dict(parts.most_common())


def replica_pid() -> int:
    [replica] = [p for p in psutil.Process().children(recursive=True) if "ServeReplica" in p.name()]
    return replica.pid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--b-set", action="append", default=[], metavar="KEY=VALUE", help="chart values")
    parser.add_argument("--out", default=str(servers.REPO / "build" / "bench" / "replica-profile.txt"))
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        parser.error("py-spy is not installed (it comes with ray[default]): run `make setup`")

    model = str(tiny_model.build(serve_local.DEMO_MODEL_DIR))
    config, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], args.b_set, model=model,
                                               port=serve_local.free_port())
    served = config["applications"][0]["args"]["model"]["servedName"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with servers.this_app(config, {}, serve_local.free_port(), {"HF_HUB_OFFLINE": "1"}) as url:
        top = args.concurrency
        asyncio.run(loadgen.run_level(url, served, PROMPTS, concurrency=top, requests=2 * top, max_tokens=16))
        with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
            recorder = subprocess.Popen([spy, "record", "--pid", str(replica_pid()), "--duration", str(args.seconds),
                                         "--rate", str(args.rate), "--format", "raw", "--output", raw.name,
                                         "--nonblocking", "--threads"], stdout=subprocess.DEVNULL)
            level = asyncio.run(loadgen.run_level(url, served, PROMPTS, concurrency=top, requests=top,
                                                  max_tokens=64, min_duration=args.seconds + 2))
            if recorder.wait() != 0:
                raise SystemExit("py-spy failed: may this user ptrace the replica process?")
            shutil.copyfile(raw.name, out)
    parts = breakdown(out.read_text())
    total = sum(parts.values())
    print(f"Replica profile at concurrency {top}: {level.output_tokens_per_s:.0f} output tok/s, "
          f"{total} samples ({out})")
    for name, count in parts.items():
        print(f"  {100 * count / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

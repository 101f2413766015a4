"""Benchmark this app against the original design and against vLLM's own server, same machine, same
model, same engine settings, same workload.

    python -m bench.run                          # tiny local model, CPU, the chart's CPU profile
    python -m bench.run --model /models/x -f my-values.yaml --concurrency 1,8,32

Workload: streaming chat completions over a fixed set of prompts of mixed lengths, `max_tokens`
fixed with EOS ignored (every server produces the same tokens), at each concurrency in turn.
Writes results.json and throughput_ttft.png into --out, and prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench import loadgen, servers
from tools import serve_local, tiny_model

REPO = Path(__file__).resolve().parent.parent
SERVER_NAMES = ("app", "original", "vllm")
LABELS = {"app": "this app", "original": "original design", "vllm": "vLLM server"}

# A fixed prompt set of mixed lengths (about 10 to 200 tokens on the tiny model's tokenizer).
_SENTENCE = "The small model answers the question about the river and the mountain city at night. "
PROMPTS = [_SENTENCE * repeat for repeat in (1, 2, 4, 8, 1, 3, 6, 12)]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = next((int(line.split()[1]) // 1024 // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    import ray
    import torch
    import vllm

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "platform": platform.platform(),
            "python": platform.python_version(), "vllm": vllm.__version__, "ray": ray.__version__,
            "torch": torch.__version__, "gpu": bool(torch.cuda.is_available())}


def requests_for(concurrency: int, per_level: int) -> int:
    return per_level if per_level else max(16, 2 * concurrency)


def run_server(name: str, url: str, model: str, args) -> list[dict]:
    print(f"\n== {LABELS[name]} at {url}", flush=True)
    # Warm up at the highest concurrency: first requests and first batch sizes pay for lazy
    # initialisation in every server, and that must not land in a measured level.
    top = max(args.concurrency)
    asyncio.run(loadgen.run_level(url, model, PROMPTS, concurrency=top, requests=top, max_tokens=16))
    levels = []
    for concurrency in args.concurrency:
        result = asyncio.run(loadgen.run_level(
            url, model, PROMPTS, concurrency=concurrency, requests=requests_for(concurrency, args.requests),
            max_tokens=args.max_tokens, time_limit=args.time_limit))
        print(f"   c={concurrency:<3} {result.output_tokens_per_s:>9.1f} tok/s  ttft p50 {result.ttft_p50_ms} ms  "
              f"errors {result.errors}  loadgen cpu {result.loadgen_cpu_percent}%", flush=True)
        levels.append(result.to_dict())
    return levels


def ratios(results: dict) -> dict:
    """The comparisons that matter, per concurrency: throughput vs the original, throughput and TTFT vs vLLM."""
    out = {}
    by_level = {name: {level["concurrency"]: level for level in levels} for name, levels in results.items()}
    for concurrency, app in by_level.get("app", {}).items():
        entry = {}
        original = by_level.get("original", {}).get(concurrency)
        vllm = by_level.get("vllm", {}).get(concurrency)
        if original and original["output_tokens_per_s"]:
            entry["throughput_vs_original"] = round(app["output_tokens_per_s"] / original["output_tokens_per_s"], 2)
        if vllm and vllm["output_tokens_per_s"]:
            entry["throughput_vs_vllm"] = round(app["output_tokens_per_s"] / vllm["output_tokens_per_s"], 2)
        if vllm and vllm["ttft_p50_ms"] and app["ttft_p50_ms"]:
            entry["ttft_p50_vs_vllm"] = round(app["ttft_p50_ms"] / vllm["ttft_p50_ms"], 2)
        out[str(concurrency)] = entry
    return out


def table(results: dict) -> str:
    header = (f"{'server':<16}{'conc':>5}{'req/s':>9}{'tok/s':>10}{'ttft p50':>10}{'ttft p95':>10}"
              f"{'itl p50':>9}{'e2e p50':>10}{'e2e p95':>10}{'errors':>8}")
    lines = [header, "-" * len(header)]
    fmt = lambda value: "-" if value is None else f"{value:.1f}"  # noqa: E731
    for name, levels in results.items():
        for level in levels:
            lines.append(f"{LABELS[name]:<16}{level['concurrency']:>5}{level['requests_per_s']:>9.2f}"
                         f"{level['output_tokens_per_s']:>10.1f}{fmt(level['ttft_p50_ms']):>10}"
                         f"{fmt(level['ttft_p95_ms']):>10}{fmt(level['itl_p50_ms']):>9}"
                         f"{fmt(level['latency_p50_ms']):>10}{fmt(level['latency_p95_ms']):>10}{level['errors']:>8}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in results.items():
        x = [level["concurrency"] for level in levels]
        throughput.plot(x, [level["output_tokens_per_s"] for level in levels], marker="o", label=LABELS[name])
        ttft.plot(x, [level["ttft_p50_ms"] or float("nan") for level in levels], marker="o", label=LABELS[name])
    for axis, title, unit in ((throughput, "Output throughput", "tokens/s"), (ttft, "Time to first token (p50)", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    ttft.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model id or path (default: the tiny model built locally)")
    parser.add_argument("-f", "--values", action="append", help="values files (default: the chart's CPU profile)")
    parser.add_argument("--servers", default=",".join(SERVER_NAMES), help="which of app,original,vllm to run")
    parser.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: max(16, 2 x concurrency))")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level at most")
    parser.add_argument("--out", default=str(REPO / "build" / "bench"))
    args = parser.parse_args(argv)

    extra_env = {}
    model = args.model
    if not model:
        model = str(tiny_model.build(serve_local.DEMO_MODEL_DIR))
        extra_env["HF_HUB_OFFLINE"] = "1"
    config, _ = serve_local.local_serve_config(args.values or [serve_local.DEFAULT_VALUES], model=model,
                                               port=serve_local.free_port())
    served = config["applications"][0]["args"]["model"]["servedName"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = {}
    started = time.monotonic()
    for name in [name for name in SERVER_NAMES if name in args.servers.split(",")]:
        if name == "app":
            server = servers.this_app(config, None, serve_local.free_port(), extra_env)
        elif name == "original":
            server = servers.original_design(config, serve_local.free_port(), extra_env)
        else:
            server = servers.vllm_server(config, serve_local.free_port(), extra_env)
        with server as url:
            results[name] = run_server(name, url, served, args)

    report = {
        "machine": machine(),
        "settings": {"model": model, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                     "prompts": len(PROMPTS), "vllm_args": servers.server_settings(config)},
        "results": results,
        "ratios": ratios(results),
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "throughput_ttft.png")
    print("\n" + table(results))
    print("\nRatios (this app / other), per concurrency:")
    for concurrency, entry in report["ratios"].items():
        print(f"  c={concurrency:<3} " + "  ".join(f"{key} {value}x" for key, value in entry.items()))
    print(f"\nMachine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{report['machine']['memory_gib']} GiB, GPU: {report['machine']['gpu']}")
    print(f"Wrote {out / 'results.json'} and {out / 'throughput_ttft.png'} ({report['wall_time_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark this app against vLLM's own server, Ray Serve LLM and the original design: same machine,
same model, same engine settings, same workload.

    python -m bench.run                          # tiny local model, CPU, the chart's CPU profile
    python -m bench.run --model /models/x -f my-values.yaml --concurrency 1,8,32
    python -m bench.run --tiny-adapters 1 --servers app,app-b --b-request-model tiny-lora-0   # adapter vs model

Workload: streaming chat completions over a fixed set of prompts of mixed lengths, `max_tokens`
fixed with EOS ignored (every server produces the same tokens), at each concurrency in turn. Each
level runs for at least --min-seconds and at least 10 x concurrency requests. Servers alternate
over --rounds rounds (each round starts every server afresh), and the table reports the median
over rounds with the range. A ratio whose range crosses 1.0 is reported as a tie.
Writes results.json and throughput_ttft.png into --out, and prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from bench import loadgen, servers
from tools import serve_local, tiny_model

REPO = Path(__file__).resolve().parent.parent
SERVER_NAMES = ("app", "app-proxy", "app-tput", "vllm", "rayllm", "original", "app-b")
LABELS = {"app": "this app", "app-proxy": "app, py proxy", "app-tput": "app, tput-opt", "vllm": "vLLM server",
          "rayllm": "Ray Serve LLM", "original": "original design", "app-b": "app, variant B"}
# What this app is compared with, in the ratios.
BASELINES = ("vllm", "rayllm", "original", "app-proxy", "app-tput", "app-b")
# What `make bench` runs unless --servers says otherwise (app-b needs --app-b or --b-set).
DEFAULT_SERVERS = SERVER_NAMES[:-1]

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
    return per_level if per_level else 10 * concurrency


def run_server(name: str, url: str, model: str, args) -> list[dict]:
    print(f"\n== {LABELS[name]} at {url}", flush=True)
    # Warm up at the highest concurrency: first requests and first batch sizes pay for lazy
    # initialisation in every server, and that must not land in a measured level.
    top = max(args.concurrency)
    asyncio.run(loadgen.run_level(url, model, PROMPTS, concurrency=top, requests=2 * top, max_tokens=16))
    levels = []
    for concurrency in args.concurrency:
        result = asyncio.run(loadgen.run_level(
            url, model, PROMPTS, concurrency=concurrency, requests=requests_for(concurrency, args.requests),
            max_tokens=args.max_tokens, min_duration=args.min_seconds, time_limit=args.time_limit,
            serving_cpu=servers.serving_path_cpu))
        print(f"   c={concurrency:<3} {result.output_tokens_per_s:>9.1f} tok/s  ttft p50 {result.ttft_p50_ms} ms  "
              f"cpu/1k tok {result.serving_cpu_s_per_1k_tokens} s  {result.duration_s:.0f} s  "
              f"errors {result.errors}  loadgen cpu {result.loadgen_cpu_percent}%", flush=True)
        levels.append(result.to_dict())
    return levels


def _by_level(rounds: list[list[dict]]) -> dict[int, list[dict]]:
    """{concurrency: [the level's result in each round]}."""
    out: dict[int, list[dict]] = {}
    for levels in rounds:
        for level in levels:
            out.setdefault(level["concurrency"], []).append(level)
    return out


def spread(values: list) -> Optional[dict]:
    values = [value for value in values if value is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def summary(results: dict) -> dict:
    """Per server and concurrency: median and range over rounds of what the table shows."""
    fields = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "serving_cpu_s_per_1k_tokens",
              "errors", "requests")
    return {name: {str(concurrency): {field: spread([level[field] for level in levels]) for field in fields}
                   for concurrency, levels in sorted(_by_level(rounds).items())}
            for name, rounds in results.items()}


def ratios(results: dict) -> dict:
    """This app over each other server, per concurrency: round i against round i (both ran in the
    same stretch of time), then the median and range over rounds. `tie` when the range crosses 1."""
    out = {}
    app = _by_level(results.get("app", []))
    for concurrency, app_levels in sorted(app.items()):
        entry = {}
        for other in BASELINES:
            other_levels = _by_level(results.get(other, [])).get(concurrency, [])
            pairs = list(zip(app_levels, other_levels))
            for metric, key in (("output_tokens_per_s", "throughput"), ("ttft_p50_ms", "ttft_p50")):
                values = [a[metric] / o[metric] for a, o in pairs if a[metric] and o[metric]]
                ratio = spread(values)
                if ratio:
                    ratio["tie"] = ratio["min"] < 1.0 < ratio["max"]
                    entry[f"{key}_vs_{other}"] = ratio
        out[str(concurrency)] = entry
    return out


def table(results: dict) -> str:
    stats = summary(results)
    header = (f"{'server':<17}{'conc':>5}{'tok/s median [range]':>26}{'ttft p50 ms':>24}{'itl p50':>9}"
              f"{'cpu s/1k tok':>20}{'errors':>8}")
    lines = [header, "-" * len(header)]

    def cell(value, digits=1):
        if value is None:
            return "-"
        return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}-{value['max']:.{digits}f}]"

    for name, levels in stats.items():
        for concurrency, level in levels.items():
            errors = level["errors"]["max"] if level["errors"] else 0
            itl = level["itl_p50_ms"]["median"] if level["itl_p50_ms"] else None
            lines.append(f"{LABELS[name]:<17}{concurrency:>5}{cell(level['output_tokens_per_s']):>26}"
                         f"{cell(level['ttft_p50_ms']):>24}{'-' if itl is None else f'{itl:.1f}':>9}"
                         f"{cell(level['serving_cpu_s_per_1k_tokens'], 2) if level['serving_cpu_s_per_1k_tokens'] else '-':>20}"
                         f"{errors:>8}")
    return "\n".join(lines)


def ratio_lines(report_ratios: dict) -> list[str]:
    lines = []
    for concurrency, entry in report_ratios.items():
        parts = []
        for key, value in entry.items():
            verdict = " (tie)" if value["tie"] else ""
            parts.append(f"{key} {value['median']:.2f}x [{value['min']:.2f}-{value['max']:.2f}]{verdict}")
        lines.append(f"  c={concurrency:<3} " + "; ".join(parts))
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in summary(results).items():
        x = [int(concurrency) for concurrency in levels]
        for axis, field in ((throughput, "output_tokens_per_s"), (ttft, "ttft_p50_ms")):
            values = [levels[str(c)][field] for c in x]
            median = [v["median"] if v else float("nan") for v in values]
            low = [v["median"] - v["min"] if v else 0 for v in values]
            high = [v["max"] - v["median"] if v else 0 for v in values]
            axis.errorbar(x, median, yerr=[low, high], marker="o", capsize=3, label=LABELS[name])
    for axis, title, unit in ((throughput, "Output throughput (median, range over rounds)", "tokens/s"),
                              (ttft, "Time to first token p50 (median, range)", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent requests")
        axis.set_ylabel(unit)
        axis.set_title(title, fontsize=10)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    ttft.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(report: dict) -> str:
    """The tables of docs/performance.md from a results.json: per server and level, then the ratios."""
    def cell(value, digits=0, unit=""):
        if not value:
            return "-"
        return f"{value['median']:,.{digits}f}{unit} ({value['min']:,.{digits}f}-{value['max']:,.{digits}f})"

    lines = ["| server | concurrency | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | serving CPU s / 1k tok | errors |",
             "| --- | --: | --: | --: | --: | --: | --: |"]
    for name, levels in report["summary"].items():
        for concurrency, level in levels.items():
            itl = level["itl_p50_ms"]["median"] if level["itl_p50_ms"] else None
            lines.append(f"| {LABELS[name]} | {concurrency} | {cell(level['output_tokens_per_s'])} | "
                         f"{cell(level['ttft_p50_ms'])} | {'-' if itl is None else f'{itl:.1f}'} | "
                         f"{cell(level['serving_cpu_s_per_1k_tokens'], 2)} | "
                         f"{int(level['errors']['max']) if level['errors'] else 0} |")
    ran = [other for other in BASELINES if other in report["summary"]]
    lines += ["", "| concurrency | " + " | ".join(f"this app / {LABELS[other]}" for other in ran) + " |",
              "| --: |" + " --: |" * len(ran)]
    for concurrency, entry in report["ratios"].items():
        cells = []
        for other in ran:
            ratio = entry.get(f"throughput_vs_{other}")
            ttft = entry.get(f"ttft_p50_vs_{other}")
            if not ratio:
                cells.append("-")
                continue
            text = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}){' tie' if ratio['tie'] else ''}"
            if ttft:
                text += f"; TTFT {ttft['median']:.2f}x"
            cells.append(text)
        lines.append(f"| {concurrency} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def tiny_adapter_values(model_dir: Path, folder: Path, count: int) -> dict:
    """Chart values serving `count` tiny LoRA adapters (tools/tiny_lora.py) for the tiny model, from
    `folder` standing for the adapters volume."""
    from tools import tiny_lora

    names = [f"tiny-lora-{index}" for index in range(count)]
    for seed, name in enumerate(names, start=1):
        tiny_lora.build(model_dir, folder / name, rank=8, seed=seed)
    return {"lora": {"enabled": True, "maxLoraRank": 8, "adapters": [{"name": name, "path": name} for name in names],
                     "volume": {"enabled": True, "mountPath": str(folder)}}}


def start(name: str, config: dict, extra_env: dict, config_b: Optional[dict] = None,
          app_b: Optional[Path] = None):
    """A context manager that starts one server and yields its URL. app-b runs `config_b` (the
    config with --b-set's values) and `app_b` (an edited vllm_app.py), either or both."""
    dashboard = serve_local.free_port()
    if name == "app":
        return servers.this_app(config, {}, dashboard, extra_env)  # the chart's default ingress
    if name == "app-b":
        return servers.this_app(config_b or config, {}, dashboard, extra_env, app_file=app_b)
    if name == "app-proxy":
        return servers.this_app(config, servers.PYTHON_PROXY, dashboard, extra_env)
    if name == "app-tput":  # the A/B for Serve's throughput-optimized mode, on top of HAProxy
        return servers.this_app(config, {}, dashboard, {**extra_env, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    if name == "original":
        return servers.original_design(config, dashboard, extra_env)
    if name == "rayllm":
        return servers.ray_serve_llm(config, dashboard, extra_env)
    return servers.vllm_server(config, serve_local.free_port(), extra_env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model id or path (default: the tiny model built locally)")
    parser.add_argument("-f", "--values", action="append", help="values files (default: the chart's CPU profile)")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help=f"which of {','.join(SERVER_NAMES)}")
    parser.add_argument("--app-b", type=Path, metavar="FILE",
                        help="an edited copy of files/vllm_app.py, served as app-b: e.g. --servers app,app-b")
    parser.add_argument("--b-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a chart value for app-b only, as helm --set takes it (e.g. "
                             "engine.streamInterval=4): the A/B of a value")
    parser.add_argument("--request-model", type=_names, metavar="NAME[,NAME...]",
                        help="the `model` requests name, in turn (default: the served model); e.g. LoRA adapters")
    parser.add_argument("--b-request-model", type=_names, metavar="NAME[,NAME...]",
                        help="the same, for app-b only: e.g. an adapter against the model on one config")
    parser.add_argument("--tiny-adapters", type=int, default=0, metavar="N",
                        help="with the tiny model: build N tiny LoRA adapters (tiny-lora-0, ...) and serve them "
                             "from values on every server (lora.enabled, lora.adapters)")
    parser.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int, default=2, help="rounds; servers alternate within each")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=0, help="requests per level at least (default: 10 x concurrency)")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="seconds per level at least")
    parser.add_argument("--time-limit", type=float, default=90.0, help="no new request after this many seconds")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the servers' processes")
    parser.add_argument("--out", default=str(REPO / "build" / "bench"))
    parser.add_argument("--markdown", metavar="RESULTS_JSON", help="only print the README tables of an earlier run")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0

    names = [name for name in args.servers.split(",") if name]
    unknown = sorted(set(names) - set(SERVER_NAMES))
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {','.join(SERVER_NAMES)}")
    if ("app-b" in names) != (args.app_b is not None or bool(args.b_set) or bool(args.b_request_model)):
        parser.error("app-b goes with --app-b FILE, --b-set KEY=VALUE or --b-request-model NAME, and they with it")
    if args.tiny_adapters and args.model:
        parser.error("--tiny-adapters builds adapters for the tiny model: leave --model out")

    extra_env = dict(item.split("=", 1) for item in args.env)
    model = args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {}
    if not model:
        model = str(tiny_model.build(serve_local.DEMO_MODEL_DIR))
        extra_env["HF_HUB_OFFLINE"] = "1"
        if args.tiny_adapters:
            overrides = tiny_adapter_values(Path(model), out.resolve() / "lora", args.tiny_adapters)
    config, _ = serve_local.local_serve_config(args.values or [serve_local.DEFAULT_VALUES], model=model,
                                               port=serve_local.free_port(), values=overrides)
    config_b = None
    if args.b_set:
        # Its key policies in a folder of its own: A's, at the same port, must not read B's.
        config_b, _ = serve_local.local_serve_config(args.values or [serve_local.DEFAULT_VALUES], args.b_set,
                                                     model=model, port=config["http_options"]["port"],
                                                     values=overrides, key_policies_dir=out.resolve() / "key-policies-b")
    served = config["applications"][0]["args"]["model"]["servedName"]
    asked = {name: args.request_model or served for name in names}
    if args.b_request_model:
        asked["app-b"] = args.b_request_model

    results: dict[str, list[list[dict]]] = {name: [] for name in names}
    started = time.monotonic()
    for round_index in range(args.rounds):
        # Alternate the order too, so no server always runs on a machine warmed by the same neighbour.
        for name in (names if round_index % 2 == 0 else list(reversed(names))):
            print(f"\n-- round {round_index + 1}/{args.rounds}", flush=True)
            with start(name, config, extra_env, config_b, args.app_b) as url:
                results[name].append(run_server(name, url, asked[name], args))

    report = {
        "machine": machine(),
        "settings": {"model": model, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                     "rounds": args.rounds, "min_seconds": args.min_seconds, "prompts": len(PROMPTS),
                     "env": extra_env, "vllm_args": servers.server_settings(config),
                     "app_b": str(args.app_b) if args.app_b else None, "b_set": args.b_set,
                     "request_models": asked},
        "results": results,
        "summary": summary(results),
        "ratios": ratios(results),
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "throughput_ttft.png")
    print("\n" + table(results))
    print("\nRatios (this app / other), median [range] over rounds, per concurrency:")
    print("\n".join(ratio_lines(report["ratios"])))
    print(f"\nMachine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{report['machine']['memory_gib']} GiB, GPU: {report['machine']['gpu']}")
    print(f"Wrote {out / 'results.json'} and {out / 'throughput_ttft.png'} ({report['wall_time_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

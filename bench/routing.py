"""Does serving.routing pay? The chart's app with 2 model replicas on the local Ray, one routing
mode after another in alternating rounds, on a model where prefill costs something.

    python -m bench.routing                                  # leastconn, prefix, session; 2 rounds
    python -m bench.routing --modes leastconn,prefix --rounds 3 --seconds 60
    python -m bench.routing --modes leastconn,prefix,rayllm-prefix   # against Ray Serve LLM's prefix router

The model: a random-weight Llama built here (tools/tiny_model.py BENCH_SHAPE, ~26M parameters,
maxModelLen 2048). Before the load, one probe measures what a cache miss costs: the time to first
token of a fresh prompt as long as a tenant's document, over the median gap between tokens (one
decode step); the ratio is printed.

Two workloads, each at --concurrency for at least --seconds:
  tenants   --tenants tenants (16), each with a long shared document (~--doc-words words) as the system
            prompt; each worker plays one user after another, each asking --turns turns (the
            conversation grows), with the user's session id in x-session-id.
  unique    the same lengths, but every prompt is new: nothing to share, so what routing costs.
With --turns 1, `tenants` is RAG over a few hot documents: a document and one new question each.
Each replica's KV cache is cut to --kv-blocks blocks (vLLM's num_gpu_blocks_override) so that it
holds about half of the tenants' documents, as a busy GPU would.

Reported per mode and workload (median over rounds, [min-max]): output tok/s, TTFT p50 and p90,
vLLM's prefix-cache hit rate (its prefix_cache_hits / prefix_cache_queries counters, from Ray's
metrics export, per replica), requests per replica, and the router's CPU seconds per 1,000
requests. Ratios are against leastconn, round i against round i. Writes results into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import statistics
import time
import urllib.request
from pathlib import Path

import aiohttp

from bench import loadgen, servers
from bench.run import machine, spread
from tools import serve_local, tiny_model

REPO = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO / "build" / "bench-llama"
SERVED = "bench-llama"
WORDS = tiny_model._WORDS


def document(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


# Every request decodes greedily with EOS ignored. A random-weight model's greedy output can be one
# special token over and over (e.g. </s>); vLLM would drop it from the text, the stream would carry
# no content, and the load generator would count a failure: keep special tokens in the text.


def values(mode: str, args) -> dict:
    return {"model": {"servedName": SERVED},
            "engine": {"maxModelLen": 2048, "extraArgs": {"num_gpu_blocks_override": args.kv_blocks,
                                                          "max_num_seqs": 16}},
            "serving": {"replicas": 2, "replicaCpus": 1, "engineStallSeconds": 300, "maxOngoingRequests": 16,
                        "maxQueuedRequests": 256, "routing": {"mode": mode, "maxImbalance": args.max_imbalance}}}


# -- the workloads ------------------------------------------------------------------------------


class Conversations:
    """Users of tenants, each asking `turns` turns; or, with unique=True, every prompt new."""

    def __init__(self, args, unique: bool, seed: int):
        self.args, self.unique = args, unique
        self.rng = random.Random(seed)
        self.docs = [document(tenant, args.doc_words) for tenant in range(args.tenants)]
        self.ids = itertools.count()

    def user(self):
        """Yields (messages, session) for one user's turns."""
        number = next(self.ids)
        tenant = self.rng.randrange(self.args.tenants)
        messages = [{"role": "system", "content": self.docs[tenant]}]
        for turn in range(self.args.turns):
            if self.unique:  # same lengths, nothing shared with any other request
                messages = [{"role": "system", "content": document(10_000 + number * 100 + turn, self.args.doc_words)}]
            messages = messages + [{"role": "user", "content": document(self.rng.random(), 20)}]
            yield messages, f"user-{number}"
            messages = messages + [{"role": "assistant", "content": document(self.rng.random(), self.args.max_tokens)}]


async def run_workload(url: str, conversations: Conversations, args) -> dict:
    results: list[loadgen.RequestResult] = []
    started = time.perf_counter()

    async def one_worker():
        while time.perf_counter() - started < args.seconds:
            turns = conversations.user()
            first, user = next(turns)
            # One connection per user, carrying the user's session id (session mode routes on it).
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                             headers={"x-session-id": user}) as session:
                for messages, _ in itertools.chain([(first, user)], turns):
                    body = {"model": SERVED, "messages": messages, "max_tokens": args.max_tokens, "ignore_eos": True,
                            "temperature": 0, "skip_special_tokens": False, "stream": True, "stream_options": {"include_usage": True}}
                    results.append(await loadgen.one_request(session, url + "/v1/chat/completions", body))

    await asyncio.gather(*(one_worker() for _ in range(args.concurrency)))
    duration = time.perf_counter() - started
    done = [r for r in results if r.ok]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"requests": len(results), "errors": len(results) - len(done), "duration_s": round(duration, 1),
            "output_tokens_per_s": round(sum(r.output_tokens for r in done) / duration, 1),
            "ttft_p50_ms": ms(loadgen.percentile(ttfts, 50)), "ttft_p90_ms": ms(loadgen.percentile(ttfts, 90)),
            "error_samples": sorted({r.error for r in results if not r.ok})[:3]}


# -- what the server says -------------------------------------------------------------------------


def scrape(metrics_url: str) -> dict:
    """{metric: {replica: value}} for vLLM's prefix-cache counters and finished requests."""
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    wanted = {"ray_vllm_prefix_cache_queries_total": "queries", "ray_vllm_prefix_cache_hits_total": "hits",
              "ray_vllm_request_success_total": "requests"}
    out: dict = {name: {} for name in wanted.values()}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in wanted:
            replica = (re.search(r'ReplicaId="([^"]*)"', line) or re.search(r'replica="([^"]*)"', line))
            key = replica.group(1) if replica else "?"
            out[wanted[name]][key] = out[wanted[name]].get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out


def delta(after: dict, before: dict) -> dict:
    return {metric: {replica: value - before.get(metric, {}).get(replica, 0) for replica, value in values.items()}
            for metric, values in after.items()}


def router_cpu_s() -> float:
    import psutil

    total = 0.0
    for process in psutil.Process().children(recursive=True):
        try:
            # This app's VLLMRouter and Ray Serve LLM's LLMRouter replicas.
            if "LLMRouter" in " ".join(process.cmdline()[:2]) or "LLMRouter" in process.name():
                times = process.cpu_times()
                total += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


async def probe(url: str, args) -> dict:
    """A cache miss's prefill against a decode step, on a fresh prompt of a document's length."""
    body = {"model": SERVED, "max_tokens": 64, "ignore_eos": True, "temperature": 0, "skip_special_tokens": False, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": document(999_999, args.doc_words)},
                         {"role": "user", "content": "probe"}]}
    async with aiohttp.ClientSession() as session:
        result = await loadgen.one_request(session, url + "/v1/chat/completions", body)
    step = statistics.median(result.gaps) if result.gaps else None
    return {"prefill_ms": round(result.ttft * 1000, 1) if result.ttft else None,
            "decode_step_ms": round(step * 1000, 2) if step else None,
            "prefill_over_decode": round(result.ttft / step, 1) if result.ttft and step else None}


# Ray Serve LLM on its fastest path with its own prefix router: the OpenAI app with direct streaming
# behind HAProxy, whose Lua asks Ray Serve LLM's router deployment (LLMRouter), which asks the model
# deployment's PrefixCacheAffinityRouter. Same model, engine arguments, replicas and imbalance guard.
RAYLLM = "rayllm-prefix"


def rayllm_config(config: dict, args) -> dict:
    """The serveConfigV2 for Ray Serve LLM, from this app's config rendered in prefix mode."""
    router = {"request_router_config": {
        "request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
        "request_router_kwargs": {"imbalanced_threshold": args.max_imbalance}},
        "ray_actor_options": {"num_cpus": 0}}
    llm_config = servers.ray_serve_llm_config(config, router, bundle_cpus=1)
    app = {"name": "rayllm", "import_path": "ray.serve.llm:build_openai_app", "route_prefix": "/",
           "args": {"llm_configs": [llm_config]}}
    return {"http_options": config["http_options"], "applications": [app]}


def run_mode(mode: str, round_number: int, args) -> dict:
    env, cpus = {"HF_HUB_OFFLINE": "1"}, 2
    # Ray Serve LLM gets the values of prefix mode: the same engine, replicas and HAProxy settings.
    config, merged = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model=str(MODEL_DIR),
                                                    port=serve_local.free_port(),
                                                    values=values("prefix" if mode == RAYLLM else mode, args))
    if mode == RAYLLM:
        config = rayllm_config(config, args)
        # Its prefix tree is a plain actor, which Ray places only where a logical CPU is free; the
        # two replicas' bundles hold both. A third logical CPU (not a core) lets it in.
        env["RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING"], cpus = "1", 3
    print(f"\n== round {round_number}, routing {mode}", flush=True)
    with serve_local.LocalServe(config, values=merged, dashboard_port=serve_local.free_port(),
                                extra_env=env, num_cpus=cpus) as server:
        out = {"probe": asyncio.run(probe(server.url, args))}
        print(f"   probe: {out['probe']}", flush=True)
        for workload in args.workloads:
            conversations = Conversations(args, unique=(workload == "unique"), seed=round_number)
            before, cpu_before = scrape(server.metrics_url), router_cpu_s()
            result = asyncio.run(run_workload(server.url, conversations, args))
            time.sleep(6)  # Ray's metrics export lags a few seconds
            counters = delta(scrape(server.metrics_url), before)
            queries, hits = sum(counters["queries"].values()), sum(counters["hits"].values())
            result["prefix_cache_hit_rate"] = round(hits / queries, 3) if queries else None
            result["hit_rate_per_replica"] = {r[-6:]: round(counters["hits"].get(r, 0) / q, 3)
                                              for r, q in counters["queries"].items() if q}
            result["requests_per_replica"] = {r[-6:]: int(n) for r, n in counters["requests"].items() if n}
            routed = max(result["requests"], 1)
            router_cpu = router_cpu_s() - cpu_before
            # All of the router replicas' CPU over the level, idle work (Serve's own loops) included.
            result["router_cpu_s_per_1k_requests"] = round(1000 * router_cpu / routed, 3) if mode != "leastconn" else None
            result["router_cpu_share_of_a_core"] = round(router_cpu / result["duration_s"], 4) if mode != "leastconn" else None
            print(f"   {workload:<8} {result['output_tokens_per_s']:>8.1f} tok/s  ttft p50 {result['ttft_p50_ms']} "
                  f"p90 {result['ttft_p90_ms']} ms  hit rate {result['prefix_cache_hit_rate']}  per replica "
                  f"{result['requests_per_replica']}  router cpu/1k {result['router_cpu_s_per_1k_requests']} s  "
                  f"errors {result['errors']} {result['error_samples'][:1]}", flush=True)
            out[workload] = result
    return out


def report(results: dict, modes: list, workloads: list) -> str:
    width = max(len(mode) for mode in [*modes, "mode"]) + 2
    lines = [f"{'mode':<{width}}{'workload':<9}{'tok/s':>22}{'ttft p50 ms':>24}{'ttft p90 ms':>24}{'hit rate':>20}"
             f"{'router cpu s/1k req':>22}"]

    def cell(values, digits=1):
        s = spread(values)
        return "-" if not s else f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"

    for mode in modes:
        for workload in workloads:
            runs = [r[workload] for r in results[mode]]
            lines.append(f"{mode:<{width}}{workload:<9}{cell([r['output_tokens_per_s'] for r in runs]):>22}"
                         f"{cell([r['ttft_p50_ms'] for r in runs]):>24}{cell([r['ttft_p90_ms'] for r in runs]):>24}"
                         f"{cell([r['prefix_cache_hit_rate'] for r in runs], 3):>20}"
                         f"{cell([r['router_cpu_s_per_1k_requests'] for r in runs], 2):>22}")
    lines.append("")
    for mode in modes:
        if mode == "leastconn" or "leastconn" not in results:
            continue
        for workload in workloads:
            pairs = list(zip(results[mode], results["leastconn"]))
            for metric in ("output_tokens_per_s", "ttft_p90_ms", "ttft_p50_ms"):
                values = [a[workload][metric] / b[workload][metric] for a, b in pairs
                          if a[workload][metric] and b[workload][metric]]
                s = spread(values)
                if s:
                    lines.append(f"{mode} / leastconn, {workload}, {metric}: {s['median']:.2f}x "
                                 f"[{s['min']:.2f}-{s['max']:.2f}] over {s['n']} rounds")
    return "\n".join(lines)


def plot(results: dict, modes: list, workloads: list, path: Path) -> None:
    """Per workload: TTFT p90 against output tok/s, one point per mode and round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4.5), squeeze=False)
    for axis, workload in zip(axes[0], workloads):
        for mode in modes:
            runs = [run[workload] for run in results.get(mode, []) if workload in run]
            axis.scatter([r["output_tokens_per_s"] for r in runs], [r["ttft_p90_ms"] for r in runs], label=mode, s=40)
        axis.set_title(f"{workload}: 2 replicas")
        axis.set_xlabel("output tok/s (higher is better)")
        axis.set_ylabel("TTFT p90, ms (lower is better)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="leastconn,prefix,session")
    parser.add_argument("--workloads", default="tenants,unique")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tenants", type=int, default=16)
    parser.add_argument("--doc-words", type=int, default=900)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=72,
                        help="KV cache blocks per replica (128 tokens each on CPU): about half the tenants' documents")
    parser.add_argument("--max-imbalance", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "build" / "bench-routing"))
    args = parser.parse_args(argv)
    args.workloads = args.workloads.split(",")
    modes = args.modes.split(",")
    tiny_model.build(MODEL_DIR, shape=tiny_model.BENCH_SHAPE)
    results: dict = {mode: [] for mode in modes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    about = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    for round_number in range(args.rounds):
        # Alternate the order each round, so that no mode always runs first on a cold machine.
        for mode in (modes if round_number % 2 == 0 else modes[::-1]):
            results[mode].append(run_mode(mode, round_number, args))
            # Written after every run: a long benchmark cut short still leaves its figures.
            (out / "results.json").write_text(json.dumps({**about, "results": results}, indent=1))
    complete = {mode: runs for mode, runs in results.items() if len(runs) == args.rounds}
    text = report(complete, [mode for mode in modes if mode in complete], args.workloads)
    print("\n" + text)
    (out / "report.txt").write_text(text + "\n")
    plot(results, modes, args.workloads, out / "routing.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

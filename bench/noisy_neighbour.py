"""The noisy neighbour: key A floods the service at 10x its capacity while key B sends a light,
steady load; what B's time to first token becomes, without policies, with a quota on A, and with
priorities (serving.keyPolicies; docs/quotas.md).

    python -m bench.noisy_neighbour [--seconds 30] [--rounds 2] [--out build/noisy]

One replica of the tiny model on a local Ray, as `make serve` runs it. The service's capacity is
measured first (requests/s of A alone, closed loop at concurrency 32). Then, per round:

  - alone:    B alone (its TTFT is the reference)
  - none:     A at 10x capacity (open loop) and B, no policies
  - quota:    the same, with A's requestsPerMinute at half the capacity
  - priority: the same, no quota, A's priority 10 and B's 0 (vLLM's priority scheduling: lower first)
  - both:     quota and priorities

Policies change live through the policy file, as a `helm upgrade` does; priority scheduling is an
engine setting, so the priority scenarios run on a second app started with it. B sends 2 streaming
requests a second (32 tokens); A non-streaming requests of 64 tokens. Writes results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp
import yaml

from bench import loadgen
from bench.run import PROMPTS, machine
from tools import serve_local, tiny_model

KEYS = {"a": "key-of-a-0123456789", "b": "key-of-b-0123456789"}
SCENARIOS = ("alone", "none", "quota", "priority", "both")


async def _b_load(url: str, model: str, seconds: float, rate: float) -> list:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 32,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEYS['b']}"},
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds:
            tasks.append(asyncio.create_task(loadgen.one_request(session, url, body)))
            await asyncio.sleep(1 / rate)
        return await asyncio.gather(*tasks)


async def _a_flood(url: str, model: str, seconds: float, rate: float, stop: asyncio.Event, counts: dict) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 64,
            "ignore_eos": True, "temperature": 0}
    connector = aiohttp.TCPConnector(limit=512)

    async def one(session):
        try:
            async with session.post(url, json=body) as response:
                await response.read()
                counts[response.status] = counts.get(response.status, 0) + 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            counts[type(error).__name__] = counts.get(type(error).__name__, 0) + 1

    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {KEYS['a']}"},
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        tasks, started, n = set(), time.perf_counter(), 0
        while not stop.is_set() and time.perf_counter() - started < seconds:
            task = asyncio.create_task(one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, started + n / rate - time.perf_counter()))
        counts["sent"] = n
        counts["sent_per_s"] = round(n / (time.perf_counter() - started), 1)
        await asyncio.gather(*tasks)


async def _scenario(url: str, model: str, seconds: float, flood_rate: float) -> dict:
    counts: dict = {}
    stop = asyncio.Event()
    flood = asyncio.create_task(_a_flood(url, model, seconds + 5, flood_rate, stop, counts)) if flood_rate else None
    if flood:
        await asyncio.sleep(5)  # A's queue builds up first
    results = await _b_load(url, model, seconds, rate=2.0)
    stop.set()
    if flood:
        await flood
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return {"b_requests": len(results), "b_errors": len(results) - len(ok),
            "b_error_samples": sorted({r.error for r in results if not r.ok})[:3],
            "b_ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
            "b_ttft_p95_ms": round(1000 * loadgen.percentile(ttfts, 95), 1) if ttfts else None,
            "a": {str(key): value for key, value in counts.items()}}


def _app(model: str, keys_dir: Path, policies_dir: Path, priorities: bool) -> dict:
    policies = {"a": {"priority": 10}, "b": {"priority": 0}} if priorities else {}
    config, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model=model, port=serve_local.free_port(),
                                               values={"model": {"servedName": "tiny-llama"},
                                                       "serving": {"keyPolicies": policies}},
                                               key_policies_dir=policies_dir)
    config["applications"][0]["args"]["serving"]["apiKeysDir"] = str(keys_dir)
    return config


def _set_quota(policies_file: Path, quota_rpm: int | None, priorities: bool) -> None:
    policies = {"a": {"priority": 10}, "b": {"priority": 0}} if priorities else {}
    if quota_rpm:
        policies.setdefault("a", {})["requestsPerMinute"] = quota_rpm
    policies_file.write_text(yaml.safe_dump({"keyPolicies": policies, "defaultKeyPolicy": {}}))
    time.sleep(7)  # the app re-reads the file every 5 s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="build/noisy")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    keys_dir = out / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    for name, key in KEYS.items():
        (keys_dir / name).write_text(key)
    model = str(tiny_model.build(serve_local.DEMO_MODEL_DIR))
    env = {"HF_HUB_OFFLINE": "1"}
    results = {name: [] for name in SCENARIOS}
    capacity = None
    for round_index in range(args.rounds):
        for priorities in (False, True):
            config = _app(model, keys_dir, out / ("policies-prio" if priorities else "policies"), priorities)
            policies_file = Path(config["applications"][0]["args"]["serving"]["keyPoliciesFile"])
            with serve_local.LocalServe(config, dashboard_port=serve_local.free_port(), extra_env=env) as server:
                url = server.url + "/v1/chat/completions"
                if capacity is None:
                    level = asyncio.run(loadgen.run_level(server.url, "tiny-llama", [PROMPTS[2]], concurrency=32,
                                                          requests=200, max_tokens=64, api_key=KEYS["a"],
                                                          min_duration=10))
                    capacity = level.requests_per_s
                    print(f"capacity: {capacity} requests/s ({level.output_tokens_per_s} tok/s)", flush=True)
                names = ("priority", "both") if priorities else ("alone", "none", "quota")
                for name in names:
                    quota = int(capacity * 60 / 2) if name in ("quota", "both") else None
                    _set_quota(policies_file, quota, priorities)
                    flood = 0 if name == "alone" else 10 * capacity
                    result = asyncio.run(_scenario(url, "tiny-llama", args.seconds, flood))
                    result["a_quota_rpm"] = quota
                    results[name].append(result)
                    print(f"round {round_index + 1} {name}: {json.dumps(result)}", flush=True)
    alone = [r["b_ttft_p50_ms"] for r in results["alone"] if r["b_ttft_p50_ms"]]
    summary = {}
    for name in SCENARIOS:
        p50s = [r["b_ttft_p50_ms"] for r in results[name] if r["b_ttft_p50_ms"]]
        ratios = [p / statistics.median(alone) for p in p50s] if alone else []
        summary[name] = {"b_ttft_p50_ms": p50s, "ratio_to_alone": [round(r, 2) for r in ratios],
                         "b_errors": [r["b_errors"] for r in results[name]]}
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "capacity_requests_per_s": capacity,
              "seconds": args.seconds, "rounds": args.rounds, "results": results, "summary": summary}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The load generator: streaming OpenAI chat completions at a fixed concurrency, timed per request.

One asyncio loop with aiohttp: each of `concurrency` workers sends requests back to back until
`requests` have been sent or `time_limit` passes. Per request it records time to first token (the
first frame with content), the gaps between content frames, end-to-end latency, and output tokens
(from the stream's usage frame). Traffic goes only to the URL given (the runner uses 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import aiohttp


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    ttft: Optional[float] = None
    latency: Optional[float] = None
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: Optional[float]
    ttft_p95_ms: Optional[float]
    itl_p50_ms: Optional[float]
    latency_p50_ms: Optional[float]
    latency_p95_ms: Optional[float]
    loadgen_cpu_percent: float
    # CPU seconds the server's serving path (every process but vLLM's engine cores) spent per 1,000
    # output tokens: a figure that travels between machines better than tokens/s.
    serving_cpu_s_per_1k_tokens: Optional[float] = None
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(concurrency: int, results: list[RequestResult], duration: float, cpu_seconds: float,
              serving_cpu_seconds: Optional[float] = None) -> LevelResult:
    done = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in done)
    ms = lambda value: None if value is None else round(value * 1000, 2)  # noqa: E731
    gaps = [gap for r in done for gap in r.gaps]
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(done),
        duration_s=round(duration, 3),
        requests_per_s=round(len(done) / duration, 3) if duration else 0.0,
        output_tokens_per_s=round(sum(r.output_tokens for r in done) / duration, 1) if duration else 0.0,
        ttft_p50_ms=ms(percentile([r.ttft for r in done if r.ttft is not None], 50)),
        ttft_p95_ms=ms(percentile([r.ttft for r in done if r.ttft is not None], 95)),
        itl_p50_ms=ms(statistics.median(gaps)) if gaps else None,
        latency_p50_ms=ms(percentile([r.latency for r in done], 50)),
        latency_p95_ms=ms(percentile([r.latency for r in done], 95)),
        loadgen_cpu_percent=round(100 * cpu_seconds / duration, 1) if duration else 0.0,
        serving_cpu_s_per_1k_tokens=(round(1000 * serving_cpu_seconds / tokens, 3)
                                     if serving_cpu_seconds is not None and tokens else None),
        error_samples=sorted({r.error for r in results if not r.ok})[:3],
    )


async def one_request(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    started = time.perf_counter()
    result = RequestResult(ok=False)
    last_content = None
    try:
        async with session.post(url, json=body) as response:
            result.status = response.status
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw_line in response.content:
                line = raw_line.strip()
                if not line.startswith(b"data: "):
                    continue
                payload = line[len(b"data: "):]
                if payload == b"[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    result.error = f"stream error: {chunk['error'].get('message', '')[:200]}"
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - started
                    else:
                        result.gaps.append(now - last_content)
                    last_content = now
        result.latency = time.perf_counter() - started
        result.ok = result.ttft is not None and result.output_tokens > 0
        if not result.ok:
            result.error = "no content or no usage in the stream"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"[:200]
    return result


async def run_level(base_url: str, model: str | list[str], prompts: list[str], *, concurrency: int, requests: int,
                    max_tokens: int, api_key: Optional[str] = None, time_limit: float = 120.0,
                    min_duration: float = 0.0, request_timeout: float = 300.0,
                    serving_cpu: Optional[Callable[[], float]] = None) -> LevelResult:
    """Send at least `requests` requests and keep sending for at least `min_duration` seconds, but
    start none after `time_limit`. `serving_cpu()`, if given, reads the server's CPU seconds.
    `model` may be a list (e.g. LoRA adapters): the requests take its names in turn."""
    models = [model] if isinstance(model, str) else list(model)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[RequestResult] = []
    counter = itertools.count()

    def body(index: int) -> dict:
        return {"model": models[index % len(models)], "messages": [{"role": "user", "content": prompts[index % len(prompts)]}],
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    server_cpu_started = serving_cpu() if serving_cpu else None
    started, cpu_started = time.perf_counter(), time.process_time()
    deadline = started + time_limit
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        async def worker():
            for index in counter:
                now = time.perf_counter()
                if now > deadline or (index >= requests and now - started >= min_duration):
                    return
                results.append(await one_request(session, url, body(index)))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - started
    server_cpu = serving_cpu() - server_cpu_started if serving_cpu else None
    return summarize(concurrency, results, duration, time.process_time() - cpu_started, server_cpu)

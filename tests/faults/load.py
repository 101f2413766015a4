"""What a client sees, request by request, while the suite breaks things.

Every request ends in exactly one of these outcomes:
- completed: a 200 with a whole answer (a stream ends with `data: [DONE]` and has no error frame);
- clean_error: an HTTP error status with OpenAI's body, or, in a stream that had started, an error
  frame followed by `data: [DONE]`;
- shed: Serve's 503 for a full queue (Serve's own plain-text body, before the request reaches the
  app), the documented answer to overload;
- cut: a fast failure without an OpenAI body: the connection closed mid-answer (an incomplete
  chunked body, which every HTTP client reports as an error) or a 5xx without OpenAI's body;
- hung: no byte for HUNG_S seconds.

HUNG_S is 45 s. The longest silence a healthy service may leave is a request held in Serve's queue
while no replica is ready: a replacement replica loads the tiny model in 20 to 30 s on this
machine's 2 cores (the suite measures it: the recovery times in docs/reliability.md). 45 s is that with
half again as margin; a client waiting longer than that is waiting on nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Optional

import httpx

HUNG_S = 45.0
# Requests in flight when a fault strikes must have ended this soon after it (measured: < 0.1 s).
FAIL_FAST_S = 10.0
OUTCOMES = ("completed", "clean_error", "shed", "cut", "disconnected", "hung")


@dataclass
class Outcome:
    kind: str
    stream: bool
    started: float
    ended: float
    status: Optional[int] = None
    first_byte: Optional[float] = None
    detail: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def is_openai_error(body) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


def classify(status: int, body: bytes, stream: bool) -> tuple[str, str]:
    """The outcome of a response that arrived whole, and a short detail."""
    text = body.decode("utf-8", "replace")
    if status == 200 and stream:
        frames = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
        if not frames or frames[-1].strip() != "[DONE]":
            return "cut", "the stream ended without data: [DONE]"
        for frame in frames[:-1]:
            try:
                parsed = json.loads(frame)
            except ValueError:
                return "cut", f"a frame that is not JSON: {frame[:80]}"
            if is_openai_error(parsed):
                return "clean_error", "error frame then [DONE]: " + parsed["error"]["message"][:120]
        return "completed", ""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if status == 200:
        if isinstance(parsed, dict) and "choices" in parsed:
            return "completed", ""
        return "cut", f"a 200 without choices: {text[:80]}"
    if is_openai_error(parsed):
        return "clean_error", f"{status}: {parsed['error']['message'][:120]}"
    if status == 503:
        return "shed", text[:80]
    return "cut", f"{status} without OpenAI's body: {text[:80]}"


def chat(model: str, index: int, max_tokens: int, stream: bool) -> dict:
    """A chat request whose length is fixed: greedy, EOS ignored, so max_tokens tokens exactly."""
    return {"model": model, "messages": [{"role": "user", "content": f"Request {index}: tell me a story."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream}


async def send(client: httpx.AsyncClient, body: dict, route: str = "/v1/chat/completions",
               disconnect_after_frames: Optional[int] = None, hung_s: float = HUNG_S) -> Outcome:
    """One request; never raises. The read timeout is per read, so it bounds the silence."""
    stream = bool(body.get("stream"))
    outcome = Outcome("hung", stream, time.monotonic(), 0.0)
    timeout = httpx.Timeout(hung_s)
    try:
        async with client.stream("POST", route, json=body, timeout=timeout) as response:
            outcome.status = response.status_code
            data = bytearray()
            async for chunk in response.aiter_bytes():
                if outcome.first_byte is None:
                    outcome.first_byte = time.monotonic()
                data.extend(chunk)
                if disconnect_after_frames is not None and data.count(b"\n\n") >= disconnect_after_frames:
                    outcome.kind, outcome.detail = "disconnected", "the client left on purpose"
                    break
            else:
                outcome.kind, outcome.detail = classify(response.status_code, bytes(data), stream)
    except (httpx.ReadTimeout, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteTimeout) as error:
        outcome.kind, outcome.detail = "hung", f"no byte for {hung_s:.0f} s ({type(error).__name__})"
    except httpx.HTTPError as error:  # closed or refused: the client knows at once
        outcome.kind, outcome.detail = "cut", f"{type(error).__name__}: {error}"[:160]
    outcome.ended = time.monotonic()
    return outcome


async def continuous(client: httpx.AsyncClient, make_body, workers: int, stop: asyncio.Event,
                     outcomes: list, pause_s: float = 0.0) -> None:
    """`workers` clients, each sending one request after another until `stop` is set."""

    async def worker(number: int):
        sent = 0
        while not stop.is_set():
            outcomes.append(await send(client, make_body(number, sent)))
            sent += 1
            if pause_s:
                await asyncio.sleep(pause_s)

    await asyncio.gather(*(worker(n) for n in range(workers)))


def counts(outcomes) -> dict:
    tally = {kind: 0 for kind in OUTCOMES}
    for outcome in outcomes:
        tally[outcome.kind] += 1
    return {"sent": len(outcomes), **tally}


def details(outcomes, kinds=("clean_error", "cut", "hung", "shed"), limit=5) -> dict:
    """A few example details per failure kind, for the figures and for assertion messages."""
    found: dict = {}
    for outcome in outcomes:
        if outcome.kind in kinds and len(found.setdefault(outcome.kind, [])) < limit:
            if outcome.detail not in found[outcome.kind]:
                found[outcome.kind].append(outcome.detail)
    return found


def client(url: str, api_key: str, connections: int = 256) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, limits=limits,
                             timeout=httpx.Timeout(HUNG_S))



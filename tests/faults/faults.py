"""Killing a process under load and watching the service heal: shared by the engine and replica
scenarios."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from tests.faults import load
from tests.faults.conftest import API_KEY, SERVED_NAME

STREAMS = 16  # the figure: 16 streams in flight when the process dies
NON_STREAMING = 8
RECOVERY_BOUND_S = 120.0  # the suite fails if the service has not answered again by then


async def kill_under_load(stack, kill) -> dict:
    """Start 16 long streams and 8 non-streaming requests, `kill()` once all are in the engine, then
    keep sending a request a second (alternately streaming) until one completes on a new replica.

    Returns the outcomes of the requests in flight at the kill, of those sent while the service
    healed, the /health statuses seen, and the seconds from the kill until a request completed.
    """
    async with load.client(stack.url, API_KEY) as client:
        in_flight = [asyncio.create_task(load.send(client, load.chat(SERVED_NAME, i, 480, stream=i < STREAMS)))
                     for i in range(STREAMS + NON_STREAMING)]
        deadline = time.monotonic() + 60
        while (in_engine := (await asyncio.to_thread(stack.stats))["engine_unfinished"]) < STREAMS:
            assert time.monotonic() < deadline, f"the load never reached the engine: {in_engine} requests there"
            await asyncio.sleep(0.1)
        killed_at = time.monotonic()
        kill()
        health: list = []
        healing: list = []
        recovered_at = None
        index = 0
        while recovered_at is None and time.monotonic() - killed_at < RECOVERY_BOUND_S:
            health.append((round(time.monotonic() - killed_at, 1),
                           await asyncio.to_thread(stack.health, 2.0)))
            index += 1
            outcome = await load.send(client, load.chat(SERVED_NAME, 1000 + index, 4, stream=index % 2 == 0))
            healing.append(outcome)
            if outcome.kind == "completed":
                recovered_at = outcome.ended
            else:
                await asyncio.sleep(max(0.0, 1.0 - outcome.seconds))
        done = await asyncio.gather(*in_flight)
    return {"in_engine_at_kill": in_engine, "in_flight": done, "healing": healing, "health": health, "killed_at": killed_at,
            "recovery_s": None if recovered_at is None else recovered_at - killed_at}


def sigkill(pid: int):
    return lambda: os.kill(pid, signal.SIGKILL)


def sigstop(pid: int):
    """A hung process: alive, holding its sockets, doing nothing."""
    return lambda: os.kill(pid, signal.SIGSTOP)


def summary(result: dict) -> dict:
    everything = result["in_flight"] + result["healing"]
    last_end = max(o.ended for o in result["in_flight"]) - result["killed_at"]
    return {**load.counts(everything), "in_flight_at_fault": load.counts(result["in_flight"]),
            "sent_while_healing": load.counts(result["healing"]),
            "in_engine_at_kill": result["in_engine_at_kill"],
            "in_flight_ended_within_s": round(last_end, 2),
            "recovery_s": None if result["recovery_s"] is None else round(result["recovery_s"], 1),
            "health_seen": sorted({str(status) for _, status in result["health"]}),
            "health_503_after_s": next((at for at, status in result["health"] if status == 503), None),
            "examples": load.details(everything)}

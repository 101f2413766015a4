"""What a production replica must do when clients misbehave: free the engine when a client goes away
mid-stream, and shed load with 503 instead of queueing without bound."""

import asyncio
import time

import httpx
import pytest

from tests.app.conftest import API_KEY, MAX_MODEL_LEN, MAX_ONGOING, MAX_QUEUED

pytestmark = pytest.mark.engine


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    return condition()


def test_a_client_that_disconnects_mid_stream_should_abort_its_engine_request(server, app_stats, model_name):
    before = app_stats()
    long_request = {"model": model_name, "messages": [{"role": "user", "content": "Tell me everything."}],
                    "max_tokens": MAX_MODEL_LEN - 64, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as raw:
        with raw.stream("POST", "/v1/chat/completions", json=long_request) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the stream started...
            assert _wait_for(lambda: app_stats()["engine_unfinished"] >= 1, timeout=10)
        # ...and the connection is closed here, long before ~2,000 tokens are generated.
    after = _wait_for(lambda: (lambda s: s if s["aborted"] > before["aborted"] else None)(app_stats()))
    assert after is not None, f"no abort recorded: {app_stats()}"
    assert _wait_for(lambda: app_stats()["engine_unfinished"] == 0, timeout=10)
    assert app_stats()["in_flight"] == 0


def test_an_overloaded_replica_should_shed_load_with_503(server, model_name):
    # More simultaneous long requests than the replica takes (max_ongoing_requests) plus what Serve
    # may queue (max_queued_requests): the excess must be refused at once, the rest served.
    total = 2 * (MAX_ONGOING + MAX_QUEUED) + 8

    async def one(client, index):
        response = await client.post("/v1/chat/completions", json={
            "model": model_name, "messages": [{"role": "user", "content": f"Load {index}"}],
            "max_tokens": 256, "ignore_eos": True})
        return response.status_code

    async def burst():
        limits = httpx.Limits(max_connections=total)
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=180, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(total)))

    statuses = asyncio.run(burst())
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0, "nothing was shed"
    assert statuses.count(200) >= MAX_ONGOING, statuses

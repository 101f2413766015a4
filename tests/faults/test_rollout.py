"""Scenario 3: new app code rolled out under load, the local equivalent of `helm upgrade` with a
changed files/vllm_app.py: the files change (the ConfigMap) and a serveConfigV2 with the new code
hash is PUT to the dashboard (what KubeRay does), while 8 clients keep sending requests."""

import asyncio
import time

import pytest

from tests.faults import load
from tests.faults.conftest import API_KEY, SERVED_NAME

pytestmark = pytest.mark.faults

CLIENTS = 8
AFTER_S = 3.0  # load keeps running this long after the new replicas serve


def _roll_out_under_load(stack, replicas: int) -> dict:
    old = stack.wait_healthy(replicas)

    async def scenario():
        stop, outcomes = asyncio.Event(), []
        async with load.client(stack.url, API_KEY) as client:
            traffic = asyncio.create_task(load.continuous(
                client, lambda worker, n: load.chat(SERVED_NAME, n, 32, stream=worker % 2 == 0), CLIENTS, stop,
                outcomes))
            await asyncio.sleep(2)
            started = time.monotonic()
            digest = await asyncio.to_thread(stack.roll_out_new_code)
            new = await asyncio.to_thread(stack.wait_healthy, replicas, 300.0, old)
            rolled_out_s = time.monotonic() - started
            await asyncio.sleep(AFTER_S)
            stop.set()
            await traffic
        return outcomes, started, rolled_out_s, digest, new

    outcomes, started, rolled_out_s, digest, new = asyncio.run(scenario())
    deployment = stack.serve.status()["applications"]["llm"]["deployments"]["VLLMServer"]
    assert deployment["deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]["VLLM_APP_SHA256"] == digest
    # The longest time nobody got an answer: the gap between two completions across the rollout.
    ends = sorted([started] + [o.ended for o in outcomes if o.kind == "completed"])
    return {**load.counts(outcomes), "replicas": replicas, "rollout_s": round(rolled_out_s, 1),
            "longest_without_an_answer_s": round(max(b - a for a, b in zip(ends, ends[1:])), 1),
            "slowest_request_s": round(max(o.seconds for o in outcomes), 1),
            "examples": load.details(outcomes), "new_replicas": sorted(new)}


def test_a_rollout_with_two_replicas_should_drop_nothing(healthy, figures):
    stack = healthy
    stack.scale(2)
    figures["rollout_2_replicas"] = summary = _roll_out_under_load(stack, 2)
    # Serve replaces one replica at a time and lets the old one finish its requests
    # (gracefulShutdownTimeoutSeconds) while the other serves: every request completes.
    assert summary["completed"] == summary["sent"], summary
    assert summary["longest_without_an_answer_s"] < 5, summary


def test_a_rollout_with_one_replica_should_make_clients_wait_not_fail(healthy, figures):
    stack = healthy
    figures["rollout_1_replica"] = summary = _roll_out_under_load(stack, 1)
    # With one replica there is no other to serve while the new one loads the model: requests wait in
    # Serve's queue (or are shed once it is full) for about the model's load time, none hangs.
    assert summary["hung"] == 0 and summary["cut"] == 0, summary
    assert summary["completed"] + summary["shed"] + summary["clean_error"] == summary["sent"], summary

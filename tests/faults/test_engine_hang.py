"""Scenario 7: vLLM's EngineCore process of the replica is SIGSTOPped (hung, not dead) while 16
streams run. vLLM's own health check sees a live process; the app's watchdog must see that the
engine makes no step while it holds requests (files/vllm_app.py, EngineWatchdog)."""

import asyncio

import psutil
import pytest

from tests.faults import faults, load

pytestmark = pytest.mark.faults

AFTER_STREAMS_END_S = 60  # the bound: the service answers again within this after that


def test_a_hung_engine_should_end_every_request_and_the_replica_should_be_replaced(healthy, figures):
    stack = healthy
    stall_s = stack.app["args"]["serving"]["engineStallSeconds"]
    [replica] = stack.running_pids()
    core = stack.engine_core(replica)

    result = asyncio.run(faults.kill_under_load(stack, faults.sigstop(core.pid)))
    figures["engine_hung"] = summary = {**faults.summary(result), "engine_stall_s": stall_s}

    in_flight = result["in_flight"]
    # No request waits silently: each ends with vLLM's error (an error frame then [DONE] in a
    # stream, an OpenAI body otherwise), soon after the watchdog's threshold.
    assert {o.kind for o in in_flight} <= {"clean_error", "completed"}, summary
    assert any(o.kind == "clean_error" for o in in_flight), summary
    assert summary["in_flight_ended_within_s"] < stall_s + 10, summary
    # /health tells the truth once the engine is known hung, and Serve replaces the replica.
    assert summary["health_503_after_s"] is not None, summary
    assert {o.kind for o in result["healing"]} <= {"clean_error", "completed"}, summary
    assert result["recovery_s"] is not None, summary
    assert result["recovery_s"] - summary["in_flight_ended_within_s"] < AFTER_STREAMS_END_S, summary
    assert summary["hung"] == 0, summary
    # The stopped engine process is gone, not left stopped behind a new replica.
    assert not psutil.pid_exists(core.pid) or core.status() == psutil.STATUS_ZOMBIE
    [new_replica] = stack.wait_healthy(1, exclude={replica})
    assert stack.stats()["pid"] == new_replica
    assert load.counts(in_flight)["hung"] == 0

"""Scenario 1: vLLM's EngineCore process of the replica is SIGKILLed while 16 streams run."""

import asyncio

import psutil
import pytest

from tests.faults import faults, load

pytestmark = pytest.mark.faults


def test_engine_death_should_end_every_request_cleanly_and_the_replica_should_be_replaced(healthy, figures):
    stack = healthy
    [replica] = stack.running_pids()
    core = stack.engine_core(replica)

    result = asyncio.run(faults.kill_under_load(stack, faults.sigkill(core.pid)))
    figures["engine_killed"] = summary = faults.summary(result)

    in_flight = result["in_flight"]
    # Every request in flight got vLLM's error: an error frame then [DONE] in a started stream, an
    # OpenAI body on a non-streaming one; none was cut or left waiting.
    assert [o.kind for o in in_flight] == ["clean_error"] * len(in_flight), summary
    assert summary["in_flight_ended_within_s"] < load.FAIL_FAST_S, summary
    # While the dead engine's replica is still routed to, new requests fail fast and cleanly too,
    # and /health says 503, until Serve's health check replaces the replica.
    assert {o.kind for o in result["healing"]} <= {"clean_error", "completed"}, summary
    assert any(status == 503 for _, status in result["health"]), summary
    assert result["recovery_s"] is not None and result["recovery_s"] < faults.RECOVERY_BOUND_S, summary
    assert summary["hung"] == 0
    [new_replica] = stack.wait_healthy(1, exclude={replica})
    assert not psutil.pid_exists(core.pid) or core.status() == psutil.STATUS_ZOMBIE
    assert stack.stats()["pid"] == new_replica

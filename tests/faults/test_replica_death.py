"""Scenario 2: the Serve replica process (the actor that holds the engine) is SIGKILLed under load."""

import asyncio
import time

import psutil
import pytest

from tests.faults import faults, load

pytestmark = pytest.mark.faults


def test_replica_death_should_fail_requests_fast_and_the_replica_should_be_replaced(healthy, figures):
    stack = healthy
    [replica] = stack.running_pids()
    core = stack.engine_core(replica)

    result = asyncio.run(faults.kill_under_load(stack, faults.sigkill(replica)))
    figures["replica_killed"] = summary = faults.summary(result)

    # The process that would write an error frame is gone, so a started answer cannot end with one:
    # Serve's ingress closes the connection mid-body (the client sees an incomplete chunked body at
    # once); a request not yet on the replica gets Serve's 503 (the router drops what it queued for
    # the dead replica). No request waits.
    assert {o.kind for o in result["in_flight"]} <= {"cut", "clean_error", "shed"}, summary
    assert summary["in_flight_ended_within_s"] < load.FAIL_FAST_S, summary
    # Requests sent while the replica is replaced wait in Serve's queue for the new one (or fail).
    assert {o.kind for o in result["healing"]} <= {"completed", "clean_error", "cut"}, summary
    assert result["recovery_s"] is not None and result["recovery_s"] < faults.RECOVERY_BOUND_S, summary
    assert summary["hung"] == 0
    stack.wait_healthy(1, exclude={replica})
    # The killed replica's engine does not outlive it (vLLM's engine watches its parent).
    deadline = time.monotonic() + 30
    while psutil.pid_exists(core.pid) and core.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not psutil.pid_exists(core.pid) or core.status() == psutil.STATUS_ZOMBIE, "an orphaned EngineCore"

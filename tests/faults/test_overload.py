"""Scenario 4: four times the configured queue at once, three times over: half of each burst is
beyond what the replica takes (MAX_ONGOING) and queues (MAX_QUEUED, as large as MAX_ONGOING)."""

import asyncio

import pytest

from tests.faults import load
from tests.faults.conftest import API_KEY, MAX_ONGOING, MAX_QUEUED, SERVED_NAME

pytestmark = pytest.mark.faults

BURST = 4 * MAX_QUEUED
BURSTS = 3
SHED_WITHIN_S = 2.0  # a refused request must know it at once, not after the backlog drained
# Bytes the replica process may grow from after the first burst (the warm-up) to after the last.
RSS_GROWTH_BOUND = 32 * 2**20


async def _burst(stack, number: int) -> list:
    async with load.client(stack.url, API_KEY, connections=BURST) as client:
        return await asyncio.gather(*(
            load.send(client, load.chat(SERVED_NAME, number * BURST + i, 64, stream=i % 2 == 0))
            for i in range(BURST)))


def test_overload_should_shed_the_excess_fast_and_serve_the_rest_with_flat_memory(healthy, figures):
    stack = healthy
    [replica] = stack.running_pids()
    outcomes, rss = [], []
    for number in range(BURSTS):
        outcomes += asyncio.run(_burst(stack, number))
        rss.append(stack.rss(replica))
    shed = [o for o in outcomes if o.kind == "shed"]
    figures["overload"] = summary = {
        **load.counts(outcomes), "burst": BURST, "bursts": BURSTS,
        "shed_slowest_s": round(max((o.seconds for o in shed), default=0), 2),
        "replica_rss_mib_after_each_burst": [round(replica_rss / 2**20) for replica_rss, _ in rss],
        "engine_rss_mib_after_each_burst": [round(engine_rss / 2**20) for _, engine_rss in rss],
        "examples": load.details(outcomes)}

    assert {o.kind for o in outcomes} <= {"completed", "shed"}, summary
    assert summary["shed"] >= BURSTS * (BURST - MAX_ONGOING - MAX_QUEUED) // 2, summary
    assert summary["completed"] >= BURSTS * MAX_ONGOING, summary
    assert all(o.status == 503 for o in shed)
    assert summary["shed_slowest_s"] < SHED_WITHIN_S, summary
    # The backlog is refused, not held: the replica's memory after the last burst is that after the first.
    assert rss[-1][0] - rss[0][0] < RSS_GROWTH_BOUND, summary
    assert stack.stats()["in_flight"] == 0 and stack.stats()["engine_unfinished"] == 0
    assert stack.running_pids() == {replica}

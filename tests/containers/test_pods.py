"""Scenarios on a real multi-node Ray made of the chart's rendered pods (tests/containers/conftest.py).

The tests of this module share one cluster and run in file order: the first ones read the
cluster as the fixture built it (one replica), test_second_replica_* scales the app to two, and the
last two read what happened when a worker was lost under load and replaced.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import httpx
import pytest

from tests.containers.harness import SERVED_NAME, chat, figures, render
from tools import cpu_image, pods

# The first test builds the image (fresh: minutes) and the cluster; every wait inside has its own bound.
pytestmark = [pytest.mark.containers, pytest.mark.timeout(1800)]

GUIDE_PROBE = "readiness (the guide's raylet-only probe)"
KUBERAY_PROBE = "readiness (KubeRay's default for RayService workers)"


def _worker_ips(cluster) -> set:
    return {pod.ip for pod in cluster.workers if pod.running()}


def _processes(pod: pods.Pod) -> str:
    return pod.exec("ps", "-eo", "comm").stdout


@pytest.fixture(scope="module", autouse=True)
def comparison_probes(cluster):
    """Beside the rendered probes, the ones review item B compares them with, on every worker."""
    for worker in cluster.workers:
        worker.watch(GUIDE_PROBE, pods.RAYLET_ONLY_PROBE)
        worker.watch(KUBERAY_PROBE, pods.kuberay_worker_readiness(cluster.rendered.serve_port))


def test_smoke_test_pod_should_pass_against_the_serve_service_name(cluster, network):
    """`helm test`: the rendered test pod (its command, env, user, read-only root, limits) from a
    fourth container, calling the serve Service's name (which resolves to the head here)."""
    spec = cluster.rendered.smoke_test_container(f"{cluster.rendered.release}-smoke-test", cluster.config_dir,
                                                 image=cpu_image.BASE_IMAGE)
    started = time.monotonic()
    code, logs = network.run_to_end(spec, timeout=300)
    figures["smoke_test_s"] = round(time.monotonic() - started, 1)
    assert code == 0, f"the smoke test exited {code}:\n{logs}"


def test_request_should_be_served_by_a_replica_on_a_worker_through_haproxy_on_the_head(cluster):
    replica_ips = cluster.running_replica_ips()
    assert len(replica_ips) == 1 and set(replica_ips) <= _worker_ips(cluster), \
        f"replica on {replica_ips}, workers are {_worker_ips(cluster)}, head is {cluster.head.ip}"
    assert "haproxy" in _processes(cluster.head), "no HAProxy on the head (RAY_SERVE_ENABLE_HA_PROXY=1 is rendered)"
    status, body = chat(cluster.serve_url())
    assert status == 200 and '"assistant"' in body, f"through the head: {status} {body[:1000]}"


def test_worker_with_the_replica_should_run_its_own_ingress(cluster):
    [replica_ip] = cluster.running_replica_ips()
    [worker] = [pod for pod in cluster.workers if pod.ip == replica_ip]
    assert "haproxy" in _processes(worker), f"no HAProxy on {worker.name}, which holds the replica"
    status, body = chat(cluster.serve_url(worker))
    assert status == 200 and '"assistant"' in body, f"through {worker.name}'s own port: {status} {body[:1000]}"


def test_idle_worker_should_not_be_ready_and_should_not_serve(cluster):
    """A worker without a replica has no ingress: the chart's probe keeps it out of the Service
    (NotReady, the guide's complaint), and rightly, because a request sent there fails."""
    [replica_ip] = cluster.running_replica_ips()
    [idle] = [pod for pod in cluster.workers if pod.ip != replica_ip]
    status, body = chat(cluster.serve_url(idle), timeout=15)
    assert status != 200, f"{idle.name} answered a request without a replica: {body[:500]}"
    figures["idle_worker_request"] = f"{status} {body[:120]}"
    pods.wait_until(lambda: None if len(idle.probes[GUIDE_PROBE].results) >= 3 else "three probe runs", 60)
    chart_probe, guide = idle.probes["readiness"], idle.probes[GUIDE_PROBE]
    assert chart_probe.first_pass() is None, f"the chart's probe passed on an idle worker:\n{idle.probe_report()}"
    assert guide.first_pass() is not None, f"the raylet-only probe never passed:\n{idle.probe_report()}"


def test_second_replica_should_land_on_the_second_worker(cluster):
    before = {replica["replica_id"] for replica in cluster.replicas() if replica.get("state") == "RUNNING"}
    started = time.monotonic()
    cluster.submit(render(replicas=2).serve_config)
    cluster.wait_replicas_on(_worker_ips(cluster), timeout=600)
    figures["second_replica_running_s"] = round(time.monotonic() - started, 1)
    replicas = [replica for replica in cluster.replicas() if replica.get("state") == "RUNNING"]
    assert sorted(replica["node_ip"] for replica in replicas) == sorted(_worker_ips(cluster))
    # num_replicas is a lightweight change: the first replica keeps running.
    assert before <= {replica["replica_id"] for replica in replicas}


# --- a worker lost under load, and its replacement -------------------------------------------------------

@dataclass
class Outcome:
    started: float  # seconds (in the record: from the kill, negative before it)
    ended: float
    result: str  # "completed", "http <status>", "error frame", "broken: ...", "hung"
    detail: str = ""


@dataclass
class LossRecord:
    outcomes: list = field(default_factory=list)
    killed: Optional[pods.Pod] = None
    replacement: Optional[pods.Pod] = None
    replacement_started: float = 0.0  # seconds from the kill
    replica_on_replacement_s: Optional[float] = None
    # (seconds from the replacement's start, status of a request to the replacement's own port)
    direct: list = field(default_factory=list)
    error: str = ""


LOAD_CLIENTS = 4
HANG_AFTER_S = 60  # a request with no byte for this long counts as hung


def _streamed_chat(url: str) -> Outcome:
    """One streamed chat through the head; its outcome with monotonic start and end times."""
    body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Count slowly to a hundred."}],
            "max_tokens": 96, "stream": True, "ignore_eos": True}
    started = time.monotonic()
    result, detail = "broken", ""
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          timeout=httpx.Timeout(HANG_AFTER_S, connect=10)) as response:
            if response.status_code != 200:
                result, detail = f"http {response.status_code}", response.read().decode(errors="replace")[:300]
            else:
                done = False
                for line in response.iter_lines():
                    done = done or line.strip() == "data: [DONE]"
                    if '"error"' in line:
                        detail = line[:300]
                result = ("completed" if done and not detail else
                          "error frame" if detail else "broken: stream ended without [DONE]")
    except httpx.ReadTimeout as error:
        result, detail = "hung", repr(error)
    except httpx.HTTPError as error:
        result, detail = f"broken: {type(error).__name__}", str(error)[:300]
    return Outcome(started, time.monotonic(), result, detail)


@pytest.fixture(scope="module")
def worker_lost_under_load(cluster):
    """Two replicas on two workers; constant streaming load through the head; one worker container
    killed (SIGKILL: the pod is lost); a new worker pod started, as KubeRay replaces a lost pod."""
    cluster.submit(render(replicas=2).serve_config)
    cluster.wait_replicas_on(_worker_ips(cluster), timeout=600)
    record = LossRecord()
    stop = threading.Event()
    raw: list = []

    def client():
        while not stop.is_set():
            raw.append(_streamed_chat(cluster.serve_url()))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(10)
    # The last worker pod started; both hold a replica now.
    record.killed = cluster.workers[-1]
    killed_at = time.monotonic()
    record.killed.kill()
    figures["kill_of"] = record.killed.name
    sampling = threading.Event()
    try:
        record.replacement = cluster.start_worker()
        record.replacement_started = time.monotonic() - killed_at
        record.replacement.watch(GUIDE_PROBE, pods.RAYLET_ONLY_PROBE)
        record.replacement.watch(KUBERAY_PROBE, pods.kuberay_worker_readiness(cluster.rendered.serve_port))

        def sample_direct():
            while not sampling.is_set():
                at = time.monotonic() - record.replacement.started
                status, text = chat(cluster.serve_url(record.replacement), timeout=10)
                record.direct.append((round(at, 1), status, text[:120]))
                sampling.wait(2)

        sampler = threading.Thread(target=sample_direct, daemon=True)
        sampler.start()
        wanted = {pod.ip for pod in cluster.workers if pod is not record.killed}
        cluster.wait_replicas_on(wanted, timeout=600)
        record.replica_on_replacement_s = round(time.monotonic() - killed_at, 1)
        time.sleep(20)  # the load keeps going on the two live replicas; the probes get to pass
        sampling.set()
        sampler.join(15)
    except pods.PodError as error:
        record.error = str(error)
    finally:
        stop.set()
        sampling.set()
        for thread in threads:
            thread.join(HANG_AFTER_S + 15)
    # Times from the kill: negative before it.
    record.outcomes = sorted((Outcome(o.started - killed_at, o.ended - killed_at, o.result, o.detail) for o in raw),
                             key=lambda outcome: outcome.started)
    yield record


def test_worker_killed_under_load_should_end_in_flight_requests_cleanly(worker_lost_under_load):
    record = worker_lost_under_load
    in_flight = [o for o in record.outcomes if o.started < 0 < o.ended]
    hung = [o for o in record.outcomes if o.result == "hung"]
    figures["kill_in_flight"] = dict(Counter(o.result.split(":")[0] for o in in_flight))
    figures["kill_in_flight_longest_end_s"] = round(max((o.ended for o in in_flight), default=0), 1)
    assert in_flight, "no request was in flight at the kill: the load did not overlap it"
    assert hung == [], f"requests that hung (no byte for {HANG_AFTER_S} s): {hung[:5]}"


def test_service_should_keep_answering_from_the_other_worker(worker_lost_under_load):
    record = worker_lost_under_load
    after = [o for o in record.outcomes if o.started >= 0]
    failed = [o for o in after if o.result != "completed"]
    figures["after_kill_requests"] = dict(Counter(o.result.split(":")[0] for o in after))
    figures["after_kill_last_failure_started_s"] = round(max((o.started for o in failed), default=0), 1)
    assert not record.error, record.error
    assert any(o.result == "completed" for o in after), f"nothing completed after the kill: {after[:10]}"
    # Once Serve has noticed the lost replica, every request completes on the live one.
    late = [o for o in failed if o.started > 30]
    assert late == [], f"requests still failing 30 s after the kill: {late[:5]}"


def test_replacement_worker_should_join_and_take_a_replica(cluster, worker_lost_under_load):
    record = worker_lost_under_load
    assert not record.error, record.error
    figures["replacement_worker_started_after_kill_s"] = round(record.replacement_started, 1)
    figures["replica_running_on_replacement_after_kill_s"] = record.replica_on_replacement_s
    assert record.replacement.ip in cluster.running_replica_ips()
    status, body = chat(cluster.serve_url(record.replacement))
    assert status == 200, f"the replacement's own ingress: {status} {body[:500]}"


def test_loading_worker_should_be_ready_only_once_it_serves(worker_lost_under_load):
    """Review item B on a worker still loading its replica: the guide's raylet-only probe calls it
    ready while requests sent to it fail; the chart's probe (KubeRay's default checks) passes only
    once it serves."""
    record = worker_lost_under_load
    assert not record.error, record.error
    pod = record.replacement
    guide, chart_probe, kuberay = pod.probes[GUIDE_PROBE], pod.probes["readiness"], pod.probes[KUBERAY_PROBE]
    served = [at for at, status, _ in record.direct if status == 200]
    first_served = min(served, default=None)
    refused_while_guide_ready = [(at, status, text) for at, status, text in record.direct
                                 if status != 200 and guide.first_pass() is not None and at >= guide.first_pass()]
    figures["loading_worker"] = {
        "raylet_only_probe_first_pass_s": guide.first_pass(),
        "chart_probe_first_pass_s": chart_probe.first_pass(),
        "kuberay_default_probe_first_pass_s": kuberay.first_pass(),
        "first_request_served_by_its_port_s": first_served,
        "requests_failed_while_raylet_only_said_ready": len(refused_while_guide_ready),
        "sample_failure": refused_while_guide_ready[0][2] if refused_while_guide_ready else "",
    }
    report = pod.probe_report()
    assert first_served is not None, f"the replacement never served on its own port: {record.direct[-5:]}\n{report}"
    assert guide.first_pass() is not None and guide.first_pass() < first_served, report
    assert refused_while_guide_ready, f"no failed request while the raylet-only probe said ready:\n{report}"
    # The chart's probe does not pass before the worker serves (within one probe period and one
    # request-sampling period of each other), and does pass once it does.
    period = chart_probe.probe.get("periodSeconds", 10)
    assert chart_probe.first_pass() is not None, report
    assert chart_probe.first_pass() >= first_served - period - 2, (chart_probe.first_pass(), first_served, report)
    assert kuberay.first_pass() is not None and kuberay.first_pass() >= first_served - period - 2, report

"""The cluster suite's decisions, checked without a cluster: readiness from recorded KubeRay
statuses, waiting, replica counting, the failure report. Part of the default run."""

from pathlib import Path

import pytest
import yaml

from tools import chart, cluster

RECORDED = yaml.safe_load((Path(__file__).parent / "recorded_statuses.yaml").read_text())


@pytest.mark.parametrize("name, ready, failed, reason_part", [
    ("v1.7-initializing", False, False, "Initializing"),
    ("v1.7-ready", True, False, "ready"),
    ("v1.7-ready-but-stale", False, False, "generation 1"),
    ("v1.7-upgrading", False, False, "upgrade in progress"),
    ("v1.7-app-deploy-failed", False, True, "Invalid vllm_app args"),
    ("v1.7-initializing-timeout", False, True, "InitializingTimeout"),
    ("v1.1-ready", True, False, "ready"),
    ("v1.1-not-ready", False, False, "serviceStatus is empty"),
])
def test_readiness_should_follow_kuberays_status(name, ready, failed, reason_part):
    state = cluster.readiness(RECORDED[name])
    assert (state.ready, state.failed) == (ready, failed)
    assert reason_part in state.reason


def test_wait_should_return_once_ready():
    states = iter([RECORDED["v1.7-initializing"], RECORDED["v1.7-initializing"], RECORDED["v1.7-ready"]])
    slept = []
    state = cluster.wait_for(lambda: cluster.readiness(next(states)), timeout=60, poll=5, sleep=slept.append)
    assert state.ready and slept == [5, 5]


def test_wait_should_stop_at_a_failure_that_cannot_recover():
    with pytest.raises(cluster.WaitFailed, match="DEPLOY_FAILED"):
        cluster.wait_for(lambda: cluster.readiness(RECORDED["v1.7-app-deploy-failed"]), timeout=60, sleep=lambda _: None)


def test_wait_should_time_out_with_the_last_reason():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(cluster.WaitTimeout, match="not ready after 20s: Ready is False \\(Initializing\\)"):
        cluster.wait_for(lambda: cluster.readiness(RECORDED["v1.7-initializing"]), timeout=20, poll=5,
                         clock=lambda: now[0], sleep=sleep)
    assert now[0] == 20


def test_running_replicas_should_count_only_running_ones():
    details = {"applications": {"llm": {"deployments": {"VLLMServer": {"replicas": [
        {"replica_id": "a", "state": "RUNNING"}, {"replica_id": "b", "state": "STARTING"},
        {"replica_id": "c", "state": "RUNNING"}]}}}}}
    assert cluster.running_replicas(details) == 2
    assert cluster.running_replicas({}) == 0


def test_failure_report_should_show_status_events_and_log_tails():
    events = [{"lastTimestamp": "2026-11-20T10:01:00Z", "type": "Warning", "reason": "FailedScheduling",
               "involvedObject": {"kind": "Pod", "name": "chat-worker-abc"},
               "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    logs = {"chat-head-xyz": "\n".join(f"line {i}" for i in range(100))}
    report = cluster.failure_report(RECORDED["v1.7-initializing"], events, logs, log_lines=5)
    assert "reason: Initializing" in report
    assert "FailedScheduling: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in report
    assert "Last 5 log lines of pod chat-head-xyz:" in report and "line 99" in report and "line 94" not in report
    assert "the RayService does not exist" in cluster.failure_report(None, [], {})


def test_leftovers_should_name_what_the_release_left_except_what_helm_keeps_and_hooks():
    def obj(kind, name, release, annotations=None):
        metadata = {"name": name, "labels": {"app.kubernetes.io/instance": release}}
        if annotations:
            metadata["annotations"] = annotations
        return {"kind": kind, "metadata": metadata}

    test_pod = chart.render(release="chat").one("Pod")  # the chart's own `helm test` hook
    objects = [obj("RayCluster", "chat-vllm-rayservice-x7k2p", "chat"), obj("Pod", "chat-head-abc", "chat"),
               obj("PersistentVolumeClaim", "chat-vllm-rayservice-model-cache", "chat",
                   {"helm.sh/resource-policy": "keep"}),
               test_pod, obj("Pod", "other-head-xyz", "other")]
    assert cluster.leftovers(objects, "chat") == ["Pod/chat-head-abc", "RayCluster/chat-vllm-rayservice-x7k2p"]
    assert cluster.leftovers([], "chat") == []

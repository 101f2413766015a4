"""The cluster suite's decisions, checked without a cluster: readiness from recorded KubeRay
statuses, waiting, replica counting, the failure report. Part of the default run."""

from pathlib import Path

import pytest
import yaml

from tests.chart import kube_schemas
from tools import chart, cluster

RECORDED = yaml.safe_load((Path(__file__).parent / "recorded_statuses.yaml").read_text())
CRDS = {path.name: path for path in kube_schemas.crd_files()}

# (recorded status, ready, failed, part of the reason): KubeRay's first install, promotion, in-place
# updates and cluster upgrades, release by release.
READINESS = [
    ("v1.1.0-creating-cluster", False, False, "serviceStatus is Restarting"),
    ("v1.1.0-deploying", False, False, "WaitForServeDeploymentReady"),
    ("v1.1.0-deploy-failed", False, True, "pending cluster chat-vllm-rayservice-raycluster-6xq2v is DEPLOY_FAILED"),
    ("v1.1.0-ready", True, False, "ready"),
    ("v1.4.2-initializing", False, False, "Ready is False (Initializing)"),
    ("v1.4.2-deploy-failed", False, True, "Invalid vllm_app args"),
    ("v1.4.2-ready", True, False, "ready"),
    ("v1.4.2-spec-rejected", False, False, "serviceStatus is empty"),  # with its event: see below
    ("v1.7.0-initializing", False, False, "Ready is False (Initializing)"),
    ("v1.7.0-deploy-failed", False, True, "on the pending cluster chat-vllm-rayservice-x7k2p is DEPLOY_FAILED"),
    ("v1.7.0-ready", True, False, "ready"),
    ("v1.7.0-ready-but-stale", False, False, "generation 1, the spec is at 2"),
    ("v1.7.0-in-place-update-deploying", False, False, "Serve application llm is DEPLOYING"),
    ("v1.7.0-in-place-deploy-failed", False, True, "on the active cluster chat-vllm-rayservice-x7k2p is DEPLOY_FAILED"),
    ("v1.7.0-upgrading", False, False, "new cluster chat-vllm-rayservice-9qz4m is being prepared"),
    ("v1.7.0-upgrade-deploy-failed", False, True, "CUDA out of memory"),
    ("v1.7.0-validation-failed", False, True, "gatewayClassName is required"),
    ("v1.7.0-initializing-timeout", False, True, "InitializingTimeout"),
]


@pytest.mark.parametrize("name, ready, failed, reason_part", READINESS, ids=[row[0] for row in READINESS])
def test_readiness_should_follow_kuberays_status(name, ready, failed, reason_part):
    state = cluster.readiness(RECORDED[name])
    assert (state.ready, state.failed) == (ready, failed)
    assert reason_part in state.reason


def test_every_recorded_status_should_be_checked():
    assert sorted(RECORDED) == sorted(row[0] for row in READINESS)


@pytest.mark.skipif(not CRDS, reason=kube_schemas.crd_missing_reason())
@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_statuses_should_have_the_shape_of_their_kuberay_version(name):
    """Validated against that release's CRD, made strict: a field KubeRay does not write fails."""
    version = name.split("-")[0]
    crd = next((path for file_name, path in CRDS.items() if f".{version}." in file_name), None)
    if crd is None:
        pytest.skip(f"no CRD for KubeRay {version} in {sorted(CRDS)}")
    assert kube_schemas.rayservice_errors(RECORDED[name], crd) == []


def test_a_spec_refused_by_kuberay_1_4_should_fail_from_its_event():
    """KubeRay v1.4.2 only emits a Warning event when it refuses a spec (for example an upgrade type
    it does not know); its status stays empty, so the event is what ends the wait."""
    event = {"type": "Warning", "reason": "InvalidRayServiceSpec",
             "involvedObject": {"kind": "RayService", "name": "chat-vllm-rayservice"},
             "message": "The RayService spec is invalid default/chat-vllm-rayservice: Spec.UpgradeStrategy.Type "
                        "value NewClusterWithIncrementalUpgrade is invalid, valid options are NewCluster or None"}
    other = dict(event, involvedObject={"kind": "RayService", "name": "someone-else"})
    state = cluster.readiness(RECORDED["v1.4.2-spec-rejected"], events=[other, event])
    assert (state.ready, state.failed) == (False, True)
    assert "NewClusterWithIncrementalUpgrade is invalid" in state.reason
    assert not cluster.readiness(RECORDED["v1.4.2-spec-rejected"], events=[other]).failed


def test_wait_should_return_once_ready():
    states = iter([RECORDED["v1.7.0-initializing"], RECORDED["v1.7.0-initializing"], RECORDED["v1.7.0-ready"]])
    slept = []
    state = cluster.wait_for(lambda: cluster.readiness(next(states)), timeout=60, poll=5, sleep=slept.append)
    assert state.ready and slept == [5, 5]


def test_wait_should_stop_at_a_failure_that_cannot_recover():
    with pytest.raises(cluster.WaitFailed, match="DEPLOY_FAILED"):
        cluster.wait_for(lambda: cluster.readiness(RECORDED["v1.7.0-deploy-failed"]), timeout=60, sleep=lambda _: None)


def test_wait_should_time_out_with_the_last_reason():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    with pytest.raises(cluster.WaitTimeout, match="not ready after 20s: Ready is False \\(Initializing\\)"):
        cluster.wait_for(lambda: cluster.readiness(RECORDED["v1.7.0-initializing"]), timeout=20, poll=5,
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
    report = cluster.failure_report(RECORDED["v1.7.0-initializing"], events, logs, log_lines=5)
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


def _pod(name, phase, scheduled=None):
    conditions = [{"type": "PodScheduled", **scheduled}] if scheduled else []
    return {"kind": "Pod", "metadata": {"name": name}, "status": {"phase": phase, "conditions": conditions}}


def _event(pod, reason, message, at, kind="Pod"):
    return {"type": "Warning", "reason": reason, "message": message, "lastTimestamp": at,
            "involvedObject": {"kind": kind, "name": pod}}


def test_scheduling_report_should_say_why_each_pending_pod_is_not_placed():
    worker = "chat-vllm-rayservice-x7k2p-cpu-workers-worker-abcde"
    pods = [_pod("chat-vllm-rayservice-x7k2p-head-4d2lq", "Running", {"status": "True"}),
            _pod(worker, "Pending", {"status": "False", "reason": "Unschedulable",
                                     "message": "0/1 nodes are available: 1 Insufficient memory."}),
            _pod("chat-vllm-rayservice-x7k2p-cpu-workers-worker-fghij", "Pending", {"status": "True"})]
    events = [_event(worker, "FailedScheduling", "0/1 nodes are available: 1 Insufficient memory.",
                     "2026-11-20T10:02:00Z"),
              _event(worker, "FailedScheduling", "0/1 nodes are available: 1 Insufficient cpu.", "2026-11-20T10:01:00Z"),
              _event("other-pod", "FailedScheduling", "not this one", "2026-11-20T10:01:30Z"),
              _event(worker, "Created", "the RayCluster's event, not the pod's", "2026-11-20T10:00:00Z",
                     kind="RayCluster")]
    report = cluster.scheduling_report(pods, events)
    assert report.splitlines() == [
        f"Pod {worker} is Pending, not scheduled (Unschedulable): 0/1 nodes are available: 1 Insufficient memory.",
        "  2026-11-20T10:01:00Z Warning FailedScheduling: 0/1 nodes are available: 1 Insufficient cpu.",
        "  2026-11-20T10:02:00Z Warning FailedScheduling: 0/1 nodes are available: 1 Insufficient memory.",
        "Pod chat-vllm-rayservice-x7k2p-cpu-workers-worker-fghij is Pending, scheduled, containers not started yet",
        "  (no events)",
    ]


def test_scheduling_report_should_be_empty_when_nothing_is_pending():
    assert cluster.scheduling_report([_pod("a", "Running", {"status": "True"})], []) == ""


def _operator_pod(image, name="kuberay-operator"):
    return {"kind": "Pod", "metadata": {"name": "kuberay-operator-5d8f7c9b6-x2x4z",
                                        "labels": dict(cluster.OPERATOR_SELECTOR)},
            "spec": {"containers": [{"name": name, "image": image}]}}


@pytest.mark.parametrize("image, version", [
    ("quay.io/kuberay/operator:v1.4.2", "1.4.2"),  # the kuberay-operator Helm chart
    ("kuberay/operator:v1.7.0", "1.7.0"),
    ("registry.local:5000/kuberay/operator:1.6.1", "1.6.1"),  # a registry with a port
    ("quay.io/kuberay/operator:latest", None),
    ("quay.io/kuberay/operator@sha256:" + "a" * 64, None),
    ("quay.io/kuberay/operator:v1.5.0-rc.1", None),
])
def test_operator_version_should_come_from_the_operators_image_tag(image, version):
    """Not the CRD's controller-gen annotation, which is the code generator's version."""
    assert cluster.operator_version([_operator_pod(image)]) == (image, version)


def test_operator_version_should_say_when_no_operator_pod_is_found_or_two_disagree():
    assert cluster.operator_version([]) == ("not found", None)
    image, version = cluster.operator_version([_operator_pod("kuberay/operator:v1.4.2"),
                                               _operator_pod("kuberay/operator:v1.7.0")])
    assert image == "kuberay/operator:v1.4.2, kuberay/operator:v1.7.0" and version is None

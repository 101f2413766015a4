"""The CPU profile's engine threads: one per CPU of the worker's limit, not pinned (ci/05 says why).

Read as the kubelet resolves the rendered worker container (tools/pods.py, container_env)."""

from tools import pods


def test_cpu_workers_should_run_one_unpinned_engine_thread_per_cpu_of_their_limit():
    cluster = pods.render_cluster()
    worker = cluster.rendered.rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = worker["template"]["spec"]["containers"][0]
    env = pods.container_env(container)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["OMP_NUM_THREADS"] == "2" == str(int(pods.quantity(container["resources"]["limits"]["cpu"])))


def test_a_resource_field_should_resolve_as_the_kubelet_does():
    container = {"resources": {"limits": {"cpu": "1500m", "memory": "6Gi"}},
                 "env": [{"name": "A", "value": "x"},
                         {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                         {"name": "MIB", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory",
                                                                            "divisor": "1Mi"}}},
                         {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    assert pods.container_env(container) == {"A": "x", "CPUS": "2", "MIB": "6144"}

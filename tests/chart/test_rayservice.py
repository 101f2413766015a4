"""templates/rayservice.yaml: what a user's values turn into, read as the user's intent."""

import hashlib
import re
import shutil

import pytest
import yaml

from tests.chart import kube_schemas
from tools import chart


def _workers(rendered):
    [group] = rendered.rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def _worker_container(rendered):
    [container] = _workers(rendered)["template"]["spec"]["containers"]
    return container


def _head(rendered):
    return rendered.rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]


def _head_container(rendered):
    [container] = _head(rendered)["template"]["spec"]["containers"]
    return container


def _deployment(rendered):
    [app] = rendered.serve_config()["applications"]
    [deployment] = app["deployments"]
    return deployment


class TestGuideDefaults:
    def test_should_reproduce_the_guides_gpu_tolerations_on_workers(self, render):
        tolerations = _workers(render())["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
        assert {"key": "nvidia.com/gpu-type", "operator": "Equal", "value": "nvidia-tesla-t4",
                "effect": "NoSchedule"} in tolerations

    def test_should_request_and_limit_one_gpu_per_worker(self, render):
        resources = _worker_container(render())["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert resources["limits"]["cpu"] == "2" and resources["limits"]["memory"] == "8Gi"

    def test_should_give_the_head_no_gpus_and_no_replicas(self, render):
        head = _head(render())
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        assert "nvidia.com/gpu" not in yaml.safe_dump(head["template"])
        assert _head_container(render())["resources"]["limits"] == {"cpu": "1", "memory": "4Gi"}

    def test_should_serve_tinyllama_with_the_guides_engine_settings(self, render):
        args = render().serve_config()["applications"][0]["args"]
        assert args["model"]["id"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
        assert args["engine"]["maxModelLen"] == 2048
        assert args["engine"]["gpuMemoryUtilization"] == 0.85
        assert args["engine"]["dtype"] == "float16"
        assert args["engine"]["tensorParallelSize"] == 1

    def test_should_emit_no_deprecated_or_newer_fields_by_default(self, render):
        spec = render().rayservice()["spec"]
        for field in ("serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
                      "upgradeStrategy", "rayClusterDeletionDelaySeconds"):
            assert field not in spec


class TestWorkers:
    def test_should_take_tolerations_node_selector_and_affinity_from_values(self, render):
        affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}]}]}}}
        rendered = render({"workers": {"tolerations": [{"key": "dedicated", "operator": "Exists"}],
                                       "nodeSelector": {"pool": "gpu"}, "affinity": affinity}})
        spec = _workers(rendered)["template"]["spec"]
        assert spec["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
        assert spec["nodeSelector"] == {"pool": "gpu"}
        assert spec["affinity"] == affinity

    def test_should_add_the_gpu_count_to_custom_resources(self, render):
        rendered = render({"workers": {"gpus": 4, "gpuResourceName": "amd.com/gpu",
                                       "resources": {"limits": {"cpu": "8"}, "requests": {"cpu": "4"}}}})
        resources = _worker_container(rendered)["resources"]
        # Helm merges the user's map into the defaults, so the default memory stays.
        assert resources == {"limits": {"cpu": "8", "memory": "8Gi", "amd.com/gpu": 4},
                             "requests": {"cpu": "4", "memory": "8Gi", "amd.com/gpu": 4}}
        assert _workers(rendered)["rayStartParams"]["num-gpus"] == "4"

    def test_cpu_workers_should_request_no_gpu(self, render):
        rendered = render({"workers": {"gpus": 0, "tolerations": []}})
        assert "gpu" not in yaml.safe_dump(_worker_container(rendered)["resources"])
        assert _deployment(rendered)["ray_actor_options"]["num_gpus"] == 0

    def test_cpu_workers_should_give_ray_the_cpus_of_exactly_one_replica(self, render):
        """Otherwise Ray counts the pod's CPU limit, Serve packs a second replica onto the same pod
        and the autoscaler never adds the worker the scale step waits for."""
        rendered = chart.render(values_files=[chart.CHART_DIR / "ci" / "05-cpu-kind-values.yaml"])
        assert _workers(rendered)["rayStartParams"]["num-cpus"] == "1"
        assert _deployment(rendered)["ray_actor_options"]["num_cpus"] == 1
        rendered = render({"workers": {"gpus": 0, "tolerations": []}, "serving": {"replicaCpus": 2}})
        assert _workers(rendered)["rayStartParams"]["num-cpus"] == "2"
        assert _deployment(rendered)["ray_actor_options"]["num_cpus"] == 2

    def test_gpu_workers_should_leave_ray_cpus_to_kuberay(self, render):
        assert "num-cpus" not in _workers(render())["rayStartParams"]  # the GPU count places replicas

    @pytest.mark.parametrize("ingress", ["haproxy", "proxy"])
    def test_workers_should_be_ready_for_traffic_only_when_their_serve_ingress_is(self, render, ingress):
        """KubeRay puts every RayService worker behind the serve Service and relies on this probe:
        raylet health and Serve's /-/healthz on the Serve port, out at the first failure, as its
        default probe for RayService workers (common/pod.go initLivenessAndReadinessProbe)."""
        rendered = render({"serving": {"ingress": ingress}})
        probe = _worker_container(rendered)["readinessProbe"]
        assert probe["exec"]["command"][:2] == ["bash", "-c"]
        raylet, serve = probe["exec"]["command"][2].split(" && ")
        assert raylet == "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
        port = rendered.serve_config()["http_options"]["port"]
        assert serve == f"wget --tries 1 -T 2 -q -O- http://localhost:{port}/-/healthz | grep success"
        assert (probe["failureThreshold"], probe["successThreshold"], probe["periodSeconds"]) == (1, 1, 5)
        assert probe["timeoutSeconds"] >= 2 + 2  # both calls fit

    def test_the_probe_should_follow_a_moved_dashboard_agent(self, render):
        probe = _worker_container(render({"workers": {"rayStartParams": {"dashboard-agent-listen-port": "52999"}}}))
        assert "http://localhost:52999/api/local_raylet_healthz" in probe["readinessProbe"]["exec"]["command"][2]

    def test_workers_should_listen_for_serve_where_the_head_and_the_service_send_it(self, render):
        rendered = render()
        [head_port] = [p for p in _head_container(rendered)["ports"] if p["name"] == "serve"]
        [service_port] = rendered.rayservice()["spec"]["serveService"]["spec"]["ports"]
        assert head_port["containerPort"] == service_port["targetPort"] == \
            rendered.serve_config()["http_options"]["port"] == 8000

    def test_should_stop_ray_before_the_pod_goes(self, render):
        assert "ray stop" in " ".join(_worker_container(render())["lifecycle"]["preStop"]["exec"]["command"])

    def test_should_mount_a_memory_backed_dev_shm_sized_from_values(self, render):
        rendered = render({"workers": {"shmSize": "16Gi"}})
        volumes = {v["name"]: v for v in _workers(rendered)["template"]["spec"]["volumes"]}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
        mounts = {m["name"]: m["mountPath"] for m in _worker_container(rendered)["volumeMounts"]}
        assert mounts["dshm"] == "/dev/shm"

    @pytest.mark.parametrize("group", ["head", "workers"])
    def test_should_pass_pod_plumbing_through(self, render, group):
        values = {group: {
            "env": [{"name": "EXTRA", "value": "1"}],
            "podLabels": {"team": "ml"}, "podAnnotations": {"note": "x"},
            "priorityClassName": "high", "podSecurityContext": {"fsGroup": 100},
            "securityContext": {"allowPrivilegeEscalation": False},
            "extraVolumes": [{"name": "scratch", "emptyDir": {}}],
            "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        }, "imagePullSecrets": [{"name": "registry"}]}
        rendered = render(values)
        spec = rendered.rayservice()["spec"]["rayClusterConfig"]
        template = (spec["headGroupSpec"] if group == "head" else spec["workerGroupSpecs"][0])["template"]
        [container] = template["spec"]["containers"]
        assert {"name": "EXTRA", "value": "1"} in container["env"]
        assert template["metadata"]["labels"]["team"] == "ml"
        assert template["metadata"]["annotations"] == {"note": "x"}
        assert template["spec"]["priorityClassName"] == "high"
        assert template["spec"]["securityContext"] == {"fsGroup": 100}
        assert container["securityContext"] == {"allowPrivilegeEscalation": False}
        assert {"name": "scratch", "emptyDir": {}} in template["spec"]["volumes"]
        assert {"name": "scratch", "mountPath": "/scratch"} in container["volumeMounts"]
        assert template["spec"]["imagePullSecrets"] == [{"name": "registry"}]

    def test_should_use_the_image_from_values_on_every_ray_container(self, render):
        rendered = render({"image": {"repository": "registry.local/ray-llm", "tag": "custom", "pullPolicy": "Always"}})
        for container in (_head_container(rendered), _worker_container(rendered)):
            assert container["image"] == "registry.local/ray-llm:custom"
            assert container["imagePullPolicy"] == "Always"


class TestAppMount:
    @pytest.mark.parametrize("container_of", [_head_container, _worker_container], ids=["head", "worker"])
    def test_should_mount_the_app_configmap_as_a_directory_on_pythonpath(self, render, container_of):
        rendered = render()
        container = container_of(rendered)
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "app"]
        assert "subPath" not in mount  # subPath mounts never see ConfigMap updates
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PYTHONPATH"] == mount["mountPath"]
        assert "$" not in env["PYTHONPATH"]  # Kubernetes would leave a literal $PYTHONPATH
        configmap = rendered.one("ConfigMap")
        # Every module of the app (files/vllm_app*.py), and the smoke test.
        app_modules = {path.name for path in (chart.CHART_DIR / "files").glob("vllm_app*.py")}
        assert {"vllm_app.py", "vllm_app_quotas.py", "vllm_app_routing.py", "vllm_app_worker.py"} <= app_modules
        assert set(configmap["data"]) == app_modules | {"smoke_test.py", "key_policies.yaml"}

    def test_configmap_should_hold_the_files_verbatim(self, render):
        """Byte for byte, final newline included: the files the pods see must hash to the
        VLLM_APP_SHA256 of serveConfigV2, or the app waits for a ConfigMap update that never comes
        (found by running the pods as containers, tests/containers)."""
        data = render().one("ConfigMap")["data"]
        assert data["vllm_app.py"] == (chart.CHART_DIR / "files" / "vllm_app.py").read_text()
        assert data["smoke_test.py"] == (chart.CHART_DIR / "files" / "smoke_test.py").read_text()


class TestServeConfig:
    def test_should_run_one_app_at_the_root_from_the_configmap_module(self, render):
        config = render().serve_config()
        [app] = config["applications"]
        assert (app["name"], app["import_path"], app["route_prefix"]) == ("llm", "vllm_app:build_app", "/")
        assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}

    def test_should_carry_model_engine_and_serving_settings_in_args(self, render):
        rendered = render({
            "model": {"id": "org/model", "servedName": "chat", "revision": "v2", "trustRemoteCode": True,
                      "chatTemplate": "{{ messages }}"},
            "engine": {"dtype": "bfloat16", "maxModelLen": 4096, "gpuMemoryUtilization": 0.9,
                       "enforceEager": True, "streamInterval": 4, "extraArgs": {"max_num_seqs": 32}},
            "openai": {"toolCallParser": "hermes", "enableAutoToolChoice": True, "reasoningParser": "qwen3",
                       "chatTemplateContentFormat": "openai", "extraArgs": {"enable_prompt_tokens_details": True}},
            "serving": {"logPrompts": True},
        })
        args = rendered.serve_config()["applications"][0]["args"]
        assert args["model"] == {"id": "org/model", "servedName": "chat", "revision": "v2",
                                 "trustRemoteCode": True, "chatTemplate": "{{ messages }}"}
        assert args["engine"]["dtype"] == "bfloat16" and args["engine"]["maxModelLen"] == 4096
        assert args["engine"]["enforceEager"] is True and args["engine"]["streamInterval"] == 4
        assert args["engine"]["extraArgs"] == {"max_num_seqs": 32}
        assert args["openai"] == {"toolCallParser": "hermes", "enableAutoToolChoice": True,
                                  "reasoningParser": "qwen3", "chatTemplateContentFormat": "openai",
                                  "extraArgs": {"enable_prompt_tokens_details": True}}
        args["serving"].pop("routing")  # tests/chart/test_routing_values.py
        assert args["serving"] == {"apiKeyEnv": "", "apiKeysDir": "", "logPrompts": True,
                                   "warmup": True, "engineStallSeconds": 60,
                                   "keyPoliciesFile": "/home/ray/vllm-rayservice/key_policies.yaml",
                                   "priorityScheduling": False}

    def test_args_should_be_what_the_app_contract_accepts(self, render):
        import sys

        sys.path.insert(0, str(chart.CHART_DIR / "files"))
        import vllm_app

        for values in ({}, {"serving": {"apiKey": {"value": "k"}, "apiKeys": {"existingSecret": "s"}},
                            "openai": {"toolCallParser": "pythonic", "enableAutoToolChoice": True}}):
            vllm_app.AppArgs.model_validate(render(values).serve_config()["applications"][0]["args"])

    def test_served_name_should_default_to_the_model_id(self, render):
        args = render({"model": {"id": "org/model"}}).serve_config()["applications"][0]["args"]
        assert args["model"]["servedName"] == "org/model"

    def test_should_reserve_the_gpus_of_every_shard_for_a_replica(self, render):
        rendered = render({"engine": {"tensorParallelSize": 2, "pipelineParallelSize": 2}, "workers": {"gpus": 4}})
        assert _deployment(rendered)["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 4}

    def test_should_pass_queue_limits_to_serve(self, render):
        deployment = _deployment(render({"serving": {"maxOngoingRequests": 32, "maxQueuedRequests": 40}}))
        assert deployment["max_ongoing_requests"] == 32
        assert deployment["max_queued_requests"] == 40

    def test_should_check_replica_health_often_and_let_stopping_replicas_finish(self, render):
        # Serve's defaults (10 s period, 20 s grace) leave a dead engine unnoticed for ~30 s and cut
        # long generations on a rollout; the chart's are shorter and longer (docs/reliability.md).
        deployment = _deployment(render({}))
        assert (deployment["health_check_period_s"], deployment["health_check_timeout_s"],
                deployment["graceful_shutdown_timeout_s"]) == (3, 15, 60)
        deployment = _deployment(render({"serving": {"healthCheck": {"periodSeconds": 1.5, "timeoutSeconds": 5},
                                                     "gracefulShutdownTimeoutSeconds": 300}}))
        assert (deployment["health_check_period_s"], deployment["health_check_timeout_s"],
                deployment["graceful_shutdown_timeout_s"]) == (1.5, 5, 300)

    def test_should_keep_a_multiline_chat_template_intact(self, render):
        template = "{% for m in messages %}\n<|{{ m['role'] }}|>: {{ m['content'] }}\n{% endfor %}\"quoted\""
        args = render({"model": {"chatTemplate": template}}).serve_config()["applications"][0]["args"]
        assert args["model"]["chatTemplate"] == template


class TestScaling:
    def test_replicas_should_drive_serve_replicas(self, render):
        assert _deployment(render({"serving": {"replicas": 3}}))["num_replicas"] == 3

    def test_one_value_should_scale_from_one_to_three_replicas_and_back(self, render):
        one, three = render({"serving": {"replicas": 1}}), render({"serving": {"replicas": 3}})
        assert (_deployment(one)["num_replicas"], _deployment(three)["num_replicas"]) == (1, 3)
        # The only change is inside serveConfigV2, which KubeRay applies in place: the cluster spec
        # KubeRay hashes stays equal, so no second cluster is built.
        def cluster_without_counts(rendered):
            group = dict(_workers(rendered))
            for key in ("replicas", "minReplicas", "maxReplicas"):
                group.pop(key)
            return group, _head(rendered)
        assert cluster_without_counts(one) == cluster_without_counts(three)

    def test_autoscaling_should_replace_fixed_replicas(self, render):
        deployment = _deployment(render({"serving": {"autoscaling": {
            "enabled": True, "minReplicas": 1, "maxReplicas": 4, "targetOngoingRequests": 8}}}))
        assert "num_replicas" not in deployment
        assert deployment["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                                    "target_ongoing_requests": 8}

    def test_should_turn_on_rays_autoscaler_with_room_for_the_most_replicas(self, render):
        rendered = render({"serving": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}})
        cluster = rendered.rayservice()["spec"]["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True
        group = _workers(rendered)
        assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (0, 2, 4)

    def test_should_pack_several_replicas_on_a_multi_gpu_worker(self, render):
        rendered = render({"workers": {"gpus": 4, "maxReplicas": 1, "resources": {"limits": {"cpu": "4"}}},
                           "serving": {"replicas": 4}})
        assert _workers(rendered)["replicas"] == 1

    # (worker values, serving.replicas, worker pods the chart starts): a GPU worker holds as many
    # replicas as its GPUs and the CPUs Ray counts on it allow (KubeRay's num-cpus: the CPU limit,
    # else the request, rounded up; or workers.rayStartParams.num-cpus).
    PACKING = [
        pytest.param({"gpus": 4}, 4, 2, id="4-gpus-but-2-cpus-hold-2-replicas"),
        pytest.param({"gpus": 4, "resources": {"limits": {"cpu": "8"}}}, 4, 1, id="4-gpus-8-cpus-hold-4"),
        pytest.param({"gpus": 4, "resources": {"limits": {"cpu": "1500m"}, "requests": {"cpu": "1500m"}}}, 4, 2,
                     id="cpu-limit-rounded-up-as-kuberay-does"),
        pytest.param({"gpus": 4, "resources": {"limits": None, "requests": {"cpu": "3"}}}, 4, 2,
                     id="cpu-request-without-a-limit"),
        pytest.param({"gpus": 4, "rayStartParams": {"num-cpus": "4"}}, 4, 1, id="num-cpus-from-ray-start-params"),
        pytest.param({"gpus": 4, "resources": {"limits": None, "requests": None}}, 4, 1, id="no-cpu-bound-known"),
        pytest.param({"gpus": 3}, 2, 1, id="3-gpus-2-cpus-hold-2"),
        pytest.param({"gpus": 0, "tolerations": []}, 2, 2, id="cpu-workers-hold-one-each"),
    ]

    @pytest.mark.parametrize("workers, replicas, pods", PACKING)
    def test_should_start_the_workers_the_replicas_fill_by_gpus_and_cpus(self, render, workers, replicas, pods):
        assert _workers(render({"workers": workers, "serving": {"replicas": replicas}}))["replicas"] == pods

    def test_should_count_fractional_replica_cpus_without_rounding_them_away(self, render):
        rendered = render({"workers": {"gpus": 10, "resources": {"limits": {"cpu": "3"}}},
                           "serving": {"replicas": 10, "replicaCpus": 0.3}})
        assert _workers(rendered)["replicas"] == 1  # 3 / 0.3 = 10 replicas on one pod, not 9

    def test_should_start_with_at_least_the_minimum_workers(self, render):
        group = _workers(render({"workers": {"minReplicas": 2}, "serving": {"replicas": 1}}))
        assert group["replicas"] == 2


INCREMENTAL = {"cluster": {"kuberayVersion": "1.7.0", "upgradeStrategy": "NewClusterWithIncrementalUpgrade",
                           "incrementalUpgrade": {"gatewayClassName": "istio"}}}


class TestUpgrades:
    def test_should_emit_upgrade_fields_only_when_set(self, render):
        values = {"cluster": {"kuberayVersion": "1.7.0", "upgradeStrategy": "None", "rayClusterDeletionDelaySeconds": 30}}
        spec = render(values).rayservice()["spec"]
        assert spec["upgradeStrategy"] == {"type": "None"}
        assert spec["rayClusterDeletionDelaySeconds"] == 30

    def test_incremental_upgrade_should_carry_the_options_kuberay_requires(self, render):
        """KubeRay 1.7 refuses NewClusterWithIncrementalUpgrade without clusterUpgradeOptions."""
        spec = render(INCREMENTAL).rayservice()["spec"]
        assert spec["upgradeStrategy"] == {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
            "gatewayClassName": "istio", "stepSizePercent": 10, "intervalSeconds": 30, "maxSurgePercent": 100}}
        assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True  # KubeRay requires it too

    @pytest.mark.skipif(not kube_schemas.crd_files(), reason=kube_schemas.crd_missing_reason())
    def test_incremental_upgrade_should_be_valid_for_kuberay_1_7_only(self, render):
        rayservice = render(INCREMENTAL).rayservice()
        for path in kube_schemas.crd_files():
            errors = kube_schemas.rayservice_errors(rayservice, path)
            if "v1.7.0" in path.name:
                assert errors == []
            if "v1.4.2" in path.name:  # 1.4 knows no clusterUpgradeOptions (and refuses the type)
                assert any("clusterUpgradeOptions" in error for error in errors)

    @pytest.mark.skipif(not kube_schemas.crd_files(), reason=kube_schemas.crd_missing_reason())
    def test_upgrade_fields_should_be_valid_where_kuberay_has_them(self, render):
        rayservice = render({"cluster": {"kuberayVersion": "1.7.0", "upgradeStrategy": "None",
                                         "rayClusterDeletionDelaySeconds": 30}}).rayservice()
        by_version = {path.name: kube_schemas.rayservice_errors(rayservice, path) for path in kube_schemas.crd_files()}
        for name, errors in by_version.items():
            if "v1.7.0" in name:
                assert errors == []
            if "v1.1.0" in name:  # no upgradeStrategy yet: the strict check says so
                assert any("upgradeStrategy" in error for error in errors)

    def test_code_change_should_change_only_the_serve_config_hash(self, tmp_path):
        copy = tmp_path / "chart"
        shutil.copytree(chart.CHART_DIR, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", "build", "tests", "__pycache__"))
        before = chart.render(chart_dir=copy)
        app_file = copy / "files" / "vllm_app.py"
        app_file.write_text(app_file.read_text() + "\n# a change\n")
        after = chart.render(chart_dir=copy)

        def code_hash(rendered):
            return rendered.serve_config()["applications"][0]["runtime_env"]["env_vars"]["VLLM_APP_SHA256"]

        assert re.fullmatch(r"[0-9a-f]{64}", code_hash(before))
        assert code_hash(before) != code_hash(after)
        # A pod-template change would make KubeRay build a second GPU cluster; a code change must not.
        assert before.rayservice()["spec"]["rayClusterConfig"] == after.rayservice()["spec"]["rayClusterConfig"]

    def test_code_hash_should_be_the_sha256_of_the_shipped_app(self, render):

        files = chart.CHART_DIR / "files"
        app_files = sorted(files.glob("vllm_app*.py"))
        assert [path.name for path in app_files][:1] == ["vllm_app.py"] and len(app_files) >= 2
        expected = hashlib.sha256(b"".join(path.read_bytes() for path in app_files)).hexdigest()
        env = render().serve_config()["applications"][0]["runtime_env"]["env_vars"]
        assert env["VLLM_APP_SHA256"] == expected

    def test_configmap_should_ship_every_app_module_the_hash_covers(self, render):
        rendered = render()
        [configmap] = [o for o in rendered.objects if o["kind"] == "ConfigMap" and "vllm_app.py" in o["data"]]
        files = chart.CHART_DIR / "files"
        for path in files.glob("vllm_app*.py"):
            assert configmap["data"][path.name] == path.read_text()
        # What the app computes on a pod (code_digest) over the files the kubelet writes from it.
        on_the_pod = "".join(configmap["data"][path.name] for path in sorted(files.glob("vllm_app*.py")))
        env = rendered.serve_config()["applications"][0]["runtime_env"]["env_vars"]
        assert hashlib.sha256(on_the_pod.encode()).hexdigest() == env["VLLM_APP_SHA256"]


class TestNamesAndLabels:
    def test_should_name_objects_after_the_release(self, render):
        rendered = render(release="chat")
        assert rendered.rayservice()["metadata"]["name"] == "chat-vllm-rayservice"
        assert rendered.rayservice()["spec"]["serveService"]["metadata"]["name"] == "chat-vllm-rayservice-serve-svc"

    def test_should_not_repeat_the_chart_name_already_in_the_release(self, render):
        assert render(release="vllm-rayservice-prod").rayservice()["metadata"]["name"] == "vllm-rayservice-prod"

    def test_names_should_fit_kuberay_and_kubernetes_limits_for_a_long_release(self, render):
        rendered = render({"serviceAccount": {"create": True}, "serving": {"apiKey": {"value": "k"}},
                           "model": {"cache": {"enabled": True}}}, release="r" * 53)
        rayservice = rendered.rayservice()["metadata"]["name"]
        assert len(rayservice) <= 47  # KubeRay's MaxRayServiceNameLength
        names = [obj["metadata"]["name"] for obj in rendered.objects]
        names.append(rendered.rayservice()["spec"]["serveService"]["metadata"]["name"])
        assert all(len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) for name in names), names

    def test_every_object_should_carry_the_standard_labels(self, render):
        rendered = render({"serviceAccount": {"create": True}, "serving": {"apiKey": {"value": "k"}},
                           "model": {"cache": {"enabled": True}}}, release="lbl")
        for obj in rendered.objects:
            labels = obj["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] == "vllm-rayservice"
            assert labels["app.kubernetes.io/instance"] == "lbl"
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["helm.sh/chart"].startswith("vllm-rayservice-")
            assert "app.kubernetes.io/version" in labels

    def test_pods_should_carry_only_the_selector_labels_and_their_component(self, render):
        rendered = render(release="lbl")
        for template, component in ((_head(rendered)["template"], "ray-head"),
                                    (_workers(rendered)["template"], "ray-worker")):
            assert template["metadata"]["labels"] == {"app.kubernetes.io/name": "vllm-rayservice",
                                                      "app.kubernetes.io/instance": "lbl",
                                                      "app.kubernetes.io/component": component}


class TestIngress:
    @staticmethod
    def _env_names(rendered):
        cluster = rendered.rayservice()["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
        return [{env["name"]: env.get("value") for env in pod["containers"][0]["env"]} for pod in pods]

    def test_should_turn_on_serves_haproxy_ingress_on_head_and_workers_by_default(self, render):
        for env in self._env_names(render({})):
            assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
            assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env

    def test_proxy_should_keep_serves_python_proxy(self, render):
        for env in self._env_names(render({"serving": {"ingress": "proxy"}})):
            assert not any(name.startswith("RAY_SERVE_") for name in env)

    def test_the_service_should_still_target_the_serve_port_haproxy_listens_on(self, render):
        rendered = render({})
        [port] = rendered.rayservice()["spec"]["serveService"]["spec"]["ports"]
        assert port["targetPort"] == rendered.serve_config()["http_options"]["port"] == 8000

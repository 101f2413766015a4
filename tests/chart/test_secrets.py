"""Secrets are referenced by name, never copied into a ConfigMap, serveConfigV2 or pod spec."""

import base64

import yaml

KEY = "sk-test-0123456789"


def _ray_containers(rendered):
    cluster = rendered.rayservice()["spec"]["rayClusterConfig"]
    return ([*cluster["headGroupSpec"]["template"]["spec"]["containers"]] +
            [c for group in cluster["workerGroupSpecs"] for c in group["template"]["spec"]["containers"]])


def _env(container, name):
    return next((e for e in container["env"] if e["name"] == name), None)


class TestApiKey:
    def test_should_turn_a_key_value_into_a_secret_and_reference_it(self, render):
        rendered = render({"serving": {"apiKey": {"value": KEY}}}, release="auth")
        secret = rendered.one("Secret")
        assert base64.b64decode(secret["data"]["api-key"]).decode() == KEY
        for container in _ray_containers(rendered):
            ref = _env(container, "VLLM_RAYSERVICE_API_KEY")["valueFrom"]["secretKeyRef"]
            assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
        args = rendered.serve_config()["applications"][0]["args"]
        assert args["serving"]["apiKeyEnv"] == "VLLM_RAYSERVICE_API_KEY"

    def test_should_never_inline_the_key_outside_its_secret(self, render):
        rendered = render({"serving": {"apiKey": {"value": KEY}}})
        for obj in rendered.objects:
            if obj["kind"] != "Secret":
                assert KEY not in yaml.safe_dump(obj), obj["kind"]

    def test_should_use_an_existing_secret_without_creating_one(self, render):
        rendered = render({"serving": {"apiKey": {"existingSecret": "team-keys", "key": "llm"}}})
        assert rendered.of_kind("Secret") == []
        for container in _ray_containers(rendered):
            assert _env(container, "VLLM_RAYSERVICE_API_KEY")["valueFrom"]["secretKeyRef"] == {
                "name": "team-keys", "key": "llm"}

    def test_should_leave_auth_off_without_a_key(self, render):
        rendered = render()
        assert rendered.of_kind("Secret") == []
        assert all(_env(c, "VLLM_RAYSERVICE_API_KEY") is None for c in _ray_containers(rendered))
        assert rendered.serve_config()["applications"][0]["args"]["serving"]["apiKeyEnv"] == ""


class TestNamedApiKeys:
    def test_should_mount_the_secret_as_a_folder_the_app_reads(self, render):
        rendered = render({"serving": {"apiKeys": {"existingSecret": "team-keys"}}})
        cluster = rendered.rayservice()["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
        for pod in pods:
            assert {"name": "api-keys", "secret": {"secretName": "team-keys"}} in pod["volumes"]
            [mount] = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == "api-keys"]
            # A folder, not subPath: the kubelet only refreshes whole-volume mounts.
            assert "subPath" not in mount and mount["readOnly"] is True
        args = rendered.serve_config()["applications"][0]["args"]
        assert args["serving"]["apiKeysDir"] == mount["mountPath"]
        assert rendered.of_kind("Secret") == []

    def test_should_work_beside_the_single_key(self, render):
        rendered = render({"serving": {"apiKey": {"value": KEY}, "apiKeys": {"existingSecret": "team-keys"}}})
        serving = rendered.serve_config()["applications"][0]["args"]["serving"]
        assert serving["apiKeyEnv"] and serving["apiKeysDir"]

    def test_should_mount_nothing_without_named_keys(self, render):
        rendered = render({})
        assert rendered.serve_config()["applications"][0]["args"]["serving"]["apiKeysDir"] == ""
        assert "api-keys" not in yaml.safe_dump(rendered.rayservice()["spec"]["rayClusterConfig"])


class TestHuggingFaceToken:
    def test_should_set_hf_token_from_the_existing_secret(self, render):
        rendered = render({"model": {"huggingFaceToken": {"existingSecret": "hf", "key": "token"}}})
        for container in _ray_containers(rendered):
            assert _env(container, "HF_TOKEN")["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}

    def test_should_set_no_token_by_default(self, render):
        assert all(_env(c, "HF_TOKEN") is None for c in _ray_containers(render()))


class TestModelCache:
    def test_should_create_a_claim_and_mount_it_at_hf_home(self, render):
        rendered = render({"model": {"cache": {"enabled": True, "size": "80Gi", "storageClassName": "fast",
                                               "accessModes": ["ReadWriteMany"]}}})
        claim = rendered.one("PersistentVolumeClaim")
        assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "fast",
                                 "resources": {"requests": {"storage": "80Gi"}}}
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        for container in _ray_containers(rendered):
            mount = next(m for m in container["volumeMounts"] if m["name"] == "model-cache")
            assert _env(container, "HF_HOME")["value"] == mount["mountPath"]

    def test_should_mount_an_existing_claim_without_creating_one(self, render):
        rendered = render({"model": {"cache": {"enabled": True, "existingClaim": "weights"}}})
        assert rendered.of_kind("PersistentVolumeClaim") == []
        volumes = rendered.rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["volumes"]
        assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "weights"}} in volumes

    def test_should_mount_no_cache_by_default(self, render):
        rendered = render()
        assert rendered.of_kind("PersistentVolumeClaim") == []
        assert "model-cache" not in yaml.safe_dump(rendered.rayservice())


class TestServiceAccount:
    def test_should_create_and_use_a_service_account_when_asked(self, render):
        rendered = render({"serviceAccount": {"create": True, "annotations": {"iam": "role"}}}, release="sa")
        account = rendered.one("ServiceAccount")
        assert account["metadata"]["annotations"] == {"iam": "role"}
        for container_spec in (rendered.rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"],
                               rendered.rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]):
            assert container_spec["serviceAccountName"] == account["metadata"]["name"]

    def test_should_use_a_named_account_without_creating_it(self, render):
        rendered = render({"serviceAccount": {"name": "existing"}})
        assert rendered.of_kind("ServiceAccount") == []
        assert rendered.rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
            "serviceAccountName"] == "existing"

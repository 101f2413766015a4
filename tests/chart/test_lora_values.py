"""LoRA adapters: the values reach the app contract (args.lora) with absolute adapter paths, the
adapters volume is mounted read-only on the workers only, and bad adapter values fail at render
time naming the key. What the app does with them is tested on the real engine (tests/app/test_lora.py)."""

import sys
from pathlib import Path

import pytest
import yaml

from tools import chart

REPO = Path(__file__).resolve().parents[2]
ON = {"enabled": True, "volume": {"enabled": True}}


def _lora(**values):
    return {"lora": chart.deep_merge(ON, values)}


def _args(rendered):
    return rendered.serve_config()["applications"][0]["args"]


def _pod_specs(rendered):
    cluster = rendered.rayservice()["spec"]["rayClusterConfig"]
    return cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]


def _contract():
    sys.path.insert(0, str(REPO / "files"))
    try:
        import vllm_app
    finally:
        sys.path.remove(str(REPO / "files"))
    return vllm_app


class TestOffByDefault:
    def test_should_render_lora_off_with_no_volume_and_no_claim(self, render):
        rendered = render()
        assert _args(rendered)["lora"]["enabled"] is False
        assert rendered.of_kind("PersistentVolumeClaim") == []
        assert "lora-adapters" not in yaml.safe_dump(rendered.rayservice())

    def test_the_app_should_give_vllm_no_lora_argument_when_off(self, render):
        vllm_app = _contract()
        args = vllm_app.AppArgs.model_validate(_args(render()))
        settings = vllm_app.vllm_server_settings(args)
        assert not {"enable_lora", "max_loras", "lora_modules"} & set(settings)
        assert vllm_app.vllm_environment_settings(args) == {}


class TestArgs:
    def test_should_pass_the_engine_limits_to_the_app(self, render):
        lora = _args(render(_lora(maxLoras=2, maxLoraRank=64, maxCpuLoras=6)))["lora"]
        assert (lora["enabled"], lora["maxLoras"], lora["maxLoraRank"], lora["maxCpuLoras"]) == (True, 2, 64, 6)

    def test_an_empty_cpu_cache_size_should_be_left_to_vllm(self, render):
        assert _args(render(_lora()))["lora"]["maxCpuLoras"] is None

    def test_relative_adapter_paths_should_start_at_the_volume_and_absolute_ones_stay(self, render):
        lora = _args(render(_lora(adapters=[{"name": "sql", "path": "sql-lora"}, {"name": "b", "path": "./team/b"},
                                            {"name": "c", "path": "/models/cache/c"}],
                                  volume={"mountPath": "/adapters/"})))["lora"]
        assert lora["adapters"] == [{"name": "sql", "path": "/adapters/sql-lora"},
                                    {"name": "b", "path": "/adapters/team/b"},
                                    {"name": "c", "path": "/models/cache/c"}]
        assert lora["folder"] == "/adapters"

    def test_absolute_paths_should_need_no_volume(self, render):
        lora = _args(render({"lora": {"enabled": True, "adapters": [{"name": "a", "path": "/models/a"}]}}))["lora"]
        assert lora["adapters"] == [{"name": "a", "path": "/models/a"}] and lora["folder"] == ""

    def test_load_on_first_use_should_point_vllms_resolver_at_the_volume(self, render):
        vllm_app = _contract()
        args = vllm_app.AppArgs.model_validate(_args(render(_lora(loadOnFirstUse=True))))
        assert vllm_app.vllm_environment_settings(args, environ={}) == {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_LORA_RESOLVER_CACHE_DIR": "/home/ray/lora-adapters"}

    def test_the_args_should_become_vllms_lora_arguments(self, render):
        vllm_app = _contract()
        args = vllm_app.AppArgs.model_validate(_args(render(_lora(
            maxLoras=2, maxLoraRank=8, adapters=[{"name": "sql", "path": "sql"}]))))
        settings = vllm_app.vllm_server_settings(args)
        assert {key: settings[key] for key in ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras",
                                               "lora_modules")} == {
            "enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": None,
            "lora_modules": [{"name": "sql", "path": "/home/ray/lora-adapters/sql"}]}


class TestAdaptersVolume:
    def test_should_mount_the_volume_read_only_on_the_workers_only(self, render):
        head, worker = _pod_specs(render(_lora(volume={"existingClaim": "adapters", "mountPath": "/lora"})))
        [mount] = [m for m in worker["containers"][0]["volumeMounts"] if m["name"] == "lora-adapters"]
        assert mount == {"name": "lora-adapters", "mountPath": "/lora", "readOnly": True}
        assert {"name": "lora-adapters", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}} \
            in worker["volumes"]
        assert "lora-adapters" not in yaml.safe_dump(head)  # the head runs no model replica

    def test_should_create_a_kept_claim_when_no_existing_one_is_given(self, render):
        rendered = render(_lora(volume={"size": "20Gi", "storageClassName": "nfs", "accessModes": ["ReadOnlyMany"]}),
                          release="ft")
        claim = rendered.one("PersistentVolumeClaim")
        assert claim["metadata"]["name"] == "ft-vllm-rayservice-lora-adapters"
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert claim["spec"] == {"accessModes": ["ReadOnlyMany"], "storageClassName": "nfs",
                                 "resources": {"requests": {"storage": "20Gi"}}}
        _, worker = _pod_specs(rendered)
        assert {"name": "lora-adapters", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"],
                                                                   "readOnly": True}} in worker["volumes"]

    def test_should_create_no_claim_for_an_existing_one(self, render):
        assert render(_lora(volume={"existingClaim": "mine"})).of_kind("PersistentVolumeClaim") == []

    def test_should_sit_beside_the_model_cache_claim(self, render):
        rendered = render(chart.deep_merge(_lora(), {"model": {"cache": {"enabled": True}}}))
        assert sorted(claim["metadata"]["name"] for claim in rendered.of_kind("PersistentVolumeClaim")) == [
            "test-vllm-rayservice-lora-adapters", "test-vllm-rayservice-model-cache"]

    def test_a_change_of_adapters_should_change_only_the_serve_config(self, render):
        """Adding an adapter restarts the app in place (serveConfigV2), never the Ray cluster."""
        before = render(_lora(adapters=[{"name": "a", "path": "a"}])).rayservice()
        after = render(_lora(adapters=[{"name": "a", "path": "a"}, {"name": "b", "path": "b"}])).rayservice()
        assert before["spec"]["rayClusterConfig"] == after["spec"]["rayClusterConfig"]
        assert before["spec"]["serveConfigV2"] != after["spec"]["serveConfigV2"]


class TestNotes:
    def test_should_name_the_adapters_and_how_to_add_one(self):
        notes = chart.render(_lora(adapters=[{"name": "sql", "path": "sql"}, {"name": "bot", "path": "bot"}],
                                   loadOnFirstUse=True), engine="python").notes
        assert "Listed in values: sql, bot" in notes
        assert "copy a new adapter there to add it with no restart" in notes

    def test_should_say_nothing_of_adapters_when_lora_is_off(self):
        assert "LoRA" not in chart.render(engine="python").notes


# (values, text the error must contain)
BAD_LORA_VALUES = [
    pytest.param({"lora": {"adapters": [{"name": "a", "path": "/a"}]}}, "set lora.enabled=true", id="adapters-while-off"),
    pytest.param({"lora": {"loadOnFirstUse": True}}, "set lora.enabled=true", id="first-use-while-off"),
    pytest.param({"lora": {"enabled": True, "loadOnFirstUse": True}}, "Set lora.volume.enabled=true",
                 id="first-use-without-volume"),
    pytest.param({"lora": {"volume": {"existingClaim": "c"}}}, "lora.volume.enabled", id="claim-without-volume"),
    pytest.param(_lora(maxLoraRank=12), "/lora/maxLoraRank", id="rank-vllm-does-not-offer"),
    pytest.param(_lora(maxLoras=0), "/lora/maxLoras", id="no-adapter-slot"),
    pytest.param(_lora(maxLoras=4, maxCpuLoras=2), "lora.maxCpuLoras (2) is below lora.maxLoras (4)",
                 id="cpu-cache-below-slots"),
    pytest.param(_lora(adapters=[{"name": "a b", "path": "a"}]), "/lora/adapters/0/name", id="name-with-a-space"),
    pytest.param(_lora(adapters=[{"name": "../etc", "path": "a"}]), "/lora/adapters/0/name", id="name-going-up"),
    pytest.param(_lora(adapters=[{"name": "team/a", "path": "a"}]), "/lora/adapters/0/name", id="name-with-a-slash"),
    pytest.param(_lora(adapters=[{"name": "a"}]), "/lora/adapters/0", id="adapter-without-path"),
    pytest.param(_lora(adapters=[{"name": "a", "path": ""}]), "/lora/adapters/0/path", id="empty-path"),
    pytest.param(_lora(adapters=[{"name": "a", "path": "a", "rank": 8}]), "rank", id="typo-in-adapter"),
    pytest.param(_lora(adapters=[{"name": "a", "path": "../other/a"}]), 'lora.adapters[0].path "../other/a"',
                 id="path-going-up"),
    pytest.param({"lora": {"enabled": True, "adapters": [{"name": "a", "path": "a"}]}},
                 "lora.adapters[0].path \"a\" is relative", id="relative-path-without-volume"),
    pytest.param(_lora(adapters=[{"name": "a", "path": "a"}, {"name": "a", "path": "b"}]),
                 'lora.adapters[1].name "a" is already the name of lora.adapters[0]', id="duplicate-names"),
    pytest.param(chart.deep_merge(_lora(adapters=[{"name": "chat", "path": "a"}]), {"model": {"servedName": "chat"}}),
                 'lora.adapters[0].name is "chat", the served model\'s name', id="adapter-named-like-the-model"),
    pytest.param(_lora(adapters=[{"name": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "path": "a"}]),
                 "/lora/adapters/0/name", id="adapter-named-like-the-model-id"),
    pytest.param(_lora(volume={"mountPath": "lora"}), "/lora/volume/mountPath", id="relative-mount-path"),
    pytest.param({"lora": {"enabld": True}}, "enabld", id="typo-lora-key"),
]


@pytest.mark.parametrize("values, names", BAD_LORA_VALUES)
def test_bad_lora_values_should_fail_with_the_key_named(values, names):
    with pytest.raises(chart.ChartError) as failure:
        chart.render(values)
    assert names in str(failure.value)


@pytest.mark.parametrize("args, problem", [
    ({"lora": {"adapters": [{"name": "a", "path": "/a"}]}}, "need enabled"),
    ({"lora": {"enabled": True, "adapters": [{"name": "a", "path": "/a"}, {"name": "a", "path": "/b"}]}}, "unique"),
    ({"lora": {"enabled": True, "maxLoras": 4, "maxCpuLoras": 2}}, "maxCpuLoras (2) must be at least maxLoras (4)"),
    ({"lora": {"enabled": True, "loadOnFirstUse": True}}, "loadOnFirstUse needs folder"),
    ({"lora": {"enabled": True, "maxLoraRank": 12}}, "lora.maxLoraRank"),
    ({"lora": {"enabled": True, "adapters": [{"name": "../x", "path": "/a"}]}}, "lora.adapters.0.name"),
    ({"model": {"id": "m", "servedName": "chat"}, "lora": {"enabled": True,
                                                           "adapters": [{"name": "chat", "path": "/a"}]}},
     "the served model's name"),
])
def test_the_app_should_refuse_the_same_lora_args_a_chart_would_not_render(args, problem):
    """The contract holds for a serveConfigV2 written by hand, too: build_app names the problem."""
    vllm_app = _contract()
    with pytest.raises(ValueError, match="Invalid vllm_app args") as failure:
        vllm_app.build_app({"model": {"id": "m"}, **args})
    assert problem in str(failure.value)

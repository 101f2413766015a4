"""serving.keyPolicies and serving.defaultKeyPolicy: checked field by field by the schema, rendered
into the app ConfigMap (which the pods already mount, so no pod template changes), read by the app
as its own contract, priority scheduling turned on only by a priority, and NOTES warning about
policies for key names no key has."""

import sys
from pathlib import Path

import pytest
import yaml

from tools import chart

FILES = Path(__file__).resolve().parents[2] / "files"
sys.path.insert(0, str(FILES))
import vllm_app  # noqa: E402
import vllm_app_quotas  # noqa: E402

POLICIES = {"team-a": {"requestsPerMinute": 60, "tokensPerMinute": 100000, "maxConcurrent": 4},
            "default": {"tokensPerMinute": 5000}}


def _serving(**values):
    return {"serving": {"apiKey": {"value": "k"}, **values}}


def _policy_file(rendered) -> str:
    [text] = [cm["data"]["key_policies.yaml"] for cm in rendered.of_kind("ConfigMap")
              if "key_policies.yaml" in cm["data"]]
    return text


def _serving_args(rendered) -> dict:
    return rendered.serve_config()["applications"][0]["args"]["serving"]


class TestRendering:
    def test_should_render_an_empty_policy_file_and_no_priority_scheduling_by_default(self, render):
        rendered = render()
        assert vllm_app_quotas.parse_policies(_policy_file(rendered)) == vllm_app_quotas.PolicyFile()
        assert _serving_args(rendered)["priorityScheduling"] is False

    def test_the_app_should_read_the_file_from_its_configmap_mount(self, render):
        rendered = render(_serving(keyPolicies=POLICIES))
        args = _serving_args(rendered)
        mount = rendered.rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
            "containers"][0]["volumeMounts"]
        [app_mount] = [m for m in mount if m["name"] == "app"]
        assert args["keyPoliciesFile"] == app_mount["mountPath"] + "/key_policies.yaml"

    def test_the_rendered_policies_should_be_what_the_app_reads(self, render):
        text = _policy_file(render(_serving(keyPolicies=POLICIES, defaultKeyPolicy={"requestsPerMinute": 10})))
        policies = vllm_app_quotas.parse_policies(text)
        assert policies.key_policies["team-a"].max_concurrent == 4
        assert policies.key_policies["default"].tokens_per_minute == 5000
        assert policies.default_key_policy.requests_per_minute == 10

    def test_the_args_should_be_what_the_app_contract_accepts(self, render):
        args = render(_serving(keyPolicies=POLICIES)).serve_config()["applications"][0]["args"]
        serving = vllm_app.AppArgs.model_validate(args).serving
        assert serving.key_policies_file.endswith("key_policies.yaml") and serving.priority_scheduling is False

    @pytest.mark.parametrize("values", [
        {"keyPolicies": {"team-a": {"priority": 1}}},
        {"keyPolicies": {"team-a": {"requestsPerMinute": 5}, "team-b": {"priority": 0}}},
        {"defaultKeyPolicy": {"priority": -2}},
    ])
    def test_a_priority_should_turn_on_vllms_priority_scheduling(self, render, values):
        rendered = render(_serving(**values))
        assert _serving_args(rendered)["priorityScheduling"] is True
        engine = vllm_app.vllm_engine_settings(vllm_app.AppArgs.model_validate(
            rendered.serve_config()["applications"][0]["args"]))
        assert engine["scheduling_policy"] == "priority"

    def test_a_null_priority_should_leave_scheduling_alone(self, render):
        assert _serving_args(render(_serving(keyPolicies={"team-a": {"priority": None}})))["priorityScheduling"] is False

    def test_changing_quotas_should_change_neither_the_pods_nor_the_serve_config(self, render):
        """Only the ConfigMap changes: no second Ray cluster, no app restart; the app re-reads it."""
        before = render(_serving(keyPolicies={"team-a": {"requestsPerMinute": 60}}))
        after = render(_serving(keyPolicies={"team-a": {"requestsPerMinute": 600, "maxConcurrent": 2}},
                                defaultKeyPolicy={"tokensPerMinute": 1000}))
        assert before.rayservice()["spec"] == after.rayservice()["spec"]
        assert _policy_file(before) != _policy_file(after)

    def test_quotas_should_add_no_volume(self, render):
        plain = render(_serving())
        with_quotas = render(_serving(keyPolicies=POLICIES))
        assert plain.rayservice()["spec"]["rayClusterConfig"] == with_quotas.rayservice()["spec"]["rayClusterConfig"]


class TestValidation:
    @pytest.mark.parametrize("policy, named", [
        ({"requestsPerMinute": -1}, "/serving/keyPolicies/team-a/requestsPerMinute"),
        ({"requestsPerMinute": 0}, "/serving/keyPolicies/team-a/requestsPerMinute"),
        ({"requestsPerMinute": 10**9}, "/serving/keyPolicies/team-a/requestsPerMinute"),
        ({"tokensPerMinute": -100}, "/serving/keyPolicies/team-a/tokensPerMinute"),
        ({"tokensPerMinute": 10**12}, "/serving/keyPolicies/team-a/tokensPerMinute"),
        ({"tokensPerMinute": 1.5}, "/serving/keyPolicies/team-a/tokensPerMinute"),
        ({"maxConcurrent": 0}, "/serving/keyPolicies/team-a/maxConcurrent"),
        ({"maxConcurrent": 10**7}, "/serving/keyPolicies/team-a/maxConcurrent"),
        ({"priority": 10**7}, "/serving/keyPolicies/team-a/priority"),
        ({"priority": "high"}, "/serving/keyPolicies/team-a/priority"),
        ({"requestsPerMinute": "60"}, "/serving/keyPolicies/team-a/requestsPerMinute"),
        ({"rpm": 60}, "/serving/keyPolicies/team-a"),
    ])
    def test_a_bad_policy_should_fail_naming_its_key(self, render, policy, named):
        with pytest.raises(chart.ChartError) as failure:
            render(_serving(keyPolicies={"team-a": policy}))
        assert named in str(failure.value)

    @pytest.mark.parametrize("values, named", [
        ({"defaultKeyPolicy": {"requestsPerMinute": -5}}, "/serving/defaultKeyPolicy/requestsPerMinute"),
        ({"defaultKeyPolicy": {"burst": 5}}, "/serving/defaultKeyPolicy"),
        ({"keyPolicies": {"bad name!": {}}}, "/serving/keyPolicies"),
        ({"keyPolicies": ["team-a"]}, "/serving/keyPolicies"),
    ])
    def test_bad_shapes_should_fail_naming_the_key(self, render, values, named):
        with pytest.raises(chart.ChartError) as failure:
            render(_serving(**values))
        assert named in str(failure.value)

    def test_the_bounds_at_render_time_should_be_the_apps_at_reread(self, render):
        """The largest numbers the schema takes are the largest the app takes, and one more fails both."""
        biggest = {"requestsPerMinute": vllm_app_quotas.MAX_REQUESTS_PER_MINUTE,
                   "tokensPerMinute": vllm_app_quotas.MAX_TOKENS_PER_MINUTE,
                   "maxConcurrent": vllm_app_quotas.MAX_CONCURRENT, "priority": -vllm_app_quotas.MAX_PRIORITY}
        text = _policy_file(render(_serving(keyPolicies={"team-a": biggest})))
        assert vllm_app_quotas.parse_policies(text).key_policies["team-a"].requests_per_minute == \
            vllm_app_quotas.MAX_REQUESTS_PER_MINUTE
        for field, value in biggest.items():
            too_big = value + (1 if value > 0 else -1)
            with pytest.raises(chart.ChartError):
                render(_serving(keyPolicies={"team-a": {field: too_big}}))
            with pytest.raises(ValueError):
                vllm_app_quotas.parse_policies(yaml.safe_dump({"keyPolicies": {"team-a": {field: too_big}}}))


class TestNotes:
    def test_a_policy_for_an_unknown_name_should_be_a_warning(self, render):
        notes = render(_serving(keyPolicies={"team-x": {"requestsPerMinute": 1}})).notes
        assert "WARNING: serving.keyPolicies has policies for team-x, but no key has that name" in notes

    def test_default_without_the_single_key_should_be_a_warning(self, render):
        notes = render({"serving": {"keyPolicies": {"default": {"requestsPerMinute": 1}}}}).notes
        assert "policies for default" in notes and "serving.apiKey's, which is not set" in notes

    def test_known_names_should_not_warn(self, render):
        assert "keyPolicies" not in render(_serving(keyPolicies={"default": {"requestsPerMinute": 1}})).notes

    def test_names_in_a_secret_the_chart_cannot_read_should_be_a_note(self, render):
        notes = render(_serving(apiKeys={"existingSecret": "llm-keys"},
                                keyPolicies={"default": {}, "team-a": {"requestsPerMinute": 1}})).notes
        assert "policies for team-a. The chart could not read Secret\nllm-keys" in notes
        assert "WARNING" not in notes

"""Named API keys and usage per key: every request is counted under its key's name (never the key)
in the log line and in the per-key counters on Ray's metrics port, and rewriting the mounted keys
revokes and admits keys while the app runs."""

import time

import httpx
import pytest

from tests.app.conftest import API_KEY, NAMED_KEYS

pytestmark = pytest.mark.engine

# The app's counters, as Ray's exporter names them on a pod's metrics port.
REQUESTS = "ray_vllm_rayservice_requests_total"
PROMPT_TOKENS = "ray_vllm_rayservice_prompt_tokens_total"
COMPLETION_TOKENS = "ray_vllm_rayservice_completion_tokens_total"


def samples(text: str, name: str) -> dict:
    """{label set: value} for one metric name in Prometheus' text format."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            found[labels] = float(value)
    return found


def total_for(text: str, name: str, **labels) -> float:
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(value for label_set, value in samples(text, name).items()
               if all(part in label_set.split(",") for part in wanted))


def wait_for_metrics(server, check, timeout=90):
    """Ray's agent exports every few seconds: poll until `check(text)` holds."""
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = httpx.get(server.metrics_url, timeout=30).text
        if check(text):
            return text
        time.sleep(2)
    return text


def chat(server, key, model_name, max_tokens):
    return httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": model_name, "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": max_tokens, "ignore_eos": True})


def test_usage_should_be_counted_per_key_name_and_equal_what_responses_reported(server, model_name):
    def counted(text):  # requests, prompt tokens, completion tokens, per key name
        return {name: [total_for(text, REQUESTS, key=name, route="/v1/chat/completions", status="200"),
                       total_for(text, PROMPT_TOKENS, key=name), total_for(text, COMPLETION_TOKENS, key=name)]
                for name in ("team-a", "team-b")}

    # Other tests' traffic may be counted already: compare what this test adds. Wait for the export
    # to settle first, so that nothing earlier arrives during the test.
    before, settled = None, counted(httpx.get(server.metrics_url, timeout=30).text)
    while before != settled:
        time.sleep(6)
        before, settled = settled, counted(httpx.get(server.metrics_url, timeout=30).text)
    reported = {name: list(values) for name, values in before.items()}
    for name, max_tokens in [("team-a", 3), ("team-a", 5), ("team-b", 7)]:
        response = chat(server, NAMED_KEYS[name], model_name, max_tokens)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        reported[name] = [reported[name][0] + 1, reported[name][1] + usage["prompt_tokens"],
                          reported[name][2] + usage["completion_tokens"]]

    text = wait_for_metrics(server, lambda text: counted(text) == reported)
    assert counted(text) == reported
    for key in [*NAMED_KEYS.values(), API_KEY]:
        assert key not in text  # names only, never the keys


def test_refused_requests_should_be_counted_without_a_name(server, model_name):
    response = chat(server, "not-a-key", model_name, 1)
    assert response.status_code == 401
    text = wait_for_metrics(server, lambda text: total_for(text, REQUESTS, key="<none>", status="401") >= 1)
    assert total_for(text, REQUESTS, key="<none>", status="401") >= 1


def test_rewriting_the_keys_should_revoke_and_admit_without_a_restart(server, named_keys_dir, app_stats, model_name):
    before = app_stats()
    assert chat(server, NAMED_KEYS["team-b"], model_name, 1).status_code == 200
    try:
        # What the kubelet does when the Secret changes: team-b is revoked, team-c is added.
        (named_keys_dir / "team-b").unlink()
        (named_keys_dir / "team-c").write_text("key-of-team-c-789\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            statuses = (chat(server, NAMED_KEYS["team-b"], model_name, 1).status_code,
                        chat(server, "key-of-team-c-789", model_name, 1).status_code)
            if statuses == (401, 200):
                break
            time.sleep(1)
        assert statuses == (401, 200)
        assert chat(server, NAMED_KEYS["team-a"], model_name, 1).status_code == 200  # untouched key
        assert chat(server, API_KEY, model_name, 1).status_code == 200  # the single key, named default
        assert app_stats()["pid"] == before["pid"]  # the same replica process: no restart
    finally:
        (named_keys_dir / "team-b").write_text(NAMED_KEYS["team-b"])
        (named_keys_dir / "team-c").unlink(missing_ok=True)

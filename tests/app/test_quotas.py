"""Quotas per API key on the real engine (files/vllm_app_quotas.py): each limit kind, OpenAI's
headers and 429 body, the openai SDK's own retry, a live quota change and a bad policy file, the
ledger's death, and two replicas sharing one limit to within 5% over a minute.

The app under test is the chart's serveConfigV2 with serving.keyPolicies, two replicas, added to the
session's local Ray (/quotas) for this module only. Its keys are a folder of its own (what the
kubelet makes of a named-keys Secret) and its policies a file of its own (what it makes of the app
ConfigMap), which the tests rewrite as `helm upgrade` would.
"""

import asyncio
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.app.conftest import API_KEY, SERVED_NAME
from tools import serve_local

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "files"))
import vllm_app_quotas  # noqa: E402

pytestmark = pytest.mark.engine

PREFIX = "/quotas"
APP = "quotas"
KEYS = {name: f"key-of-{name}-0123" for name in
        ("rpm", "tpm", "stream", "conc", "sdk", "sdk-rpm", "live", "bad-file", "death", "acc-rpm", "acc-tpm",
         "unlimited", "prio")}
ACCURACY_RPM = 120
ACCURACY_TPM = 6000
POLICIES = {
    "rpm": {"requestsPerMinute": 5},
    "tpm": {"tokensPerMinute": 300},
    "stream": {"tokensPerMinute": 50},
    "conc": {"maxConcurrent": 2},
    "sdk": {"maxConcurrent": 1},
    "sdk-rpm": {"requestsPerMinute": 2},
    "live": {"requestsPerMinute": 1},
    "bad-file": {"requestsPerMinute": 1},
    "death": {"requestsPerMinute": 20},
    "acc-rpm": {"requestsPerMinute": ACCURACY_RPM},
    "acc-tpm": {"tokensPerMinute": ACCURACY_TPM},
    # A priority turns on vLLM's priority scheduling, which every other key then runs under (at 0).
    "prio": {"priority": -1},
}
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def quota_app(server, tiny_model_dir, tmp_path_factory):
    keys_dir = tmp_path_factory.mktemp("quota-keys")
    for name, key in KEYS.items():
        (keys_dir / name).write_text(key)
    values = {"model": {"servedName": SERVED_NAME}, "engine": {"maxModelLen": 2048},
              "serving": {"apiKey": {"value": API_KEY}, "replicas": 2, "maxOngoingRequests": 32,
                          "maxQueuedRequests": 64, "keyPolicies": POLICIES}}
    config, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model=str(tiny_model_dir),
                                               port=server.port, values=values,
                                               key_policies_dir=tmp_path_factory.mktemp("quota-policies"))
    [app] = config["applications"]
    app.update(name=APP, route_prefix=PREFIX)
    app["args"]["serving"]["apiKeysDir"] = str(keys_dir)
    app["args"]["serving"]["engineStallSeconds"] = 120
    deployment = app["deployments"][0]
    deployment["ray_actor_options"]["num_cpus"] = 0
    deployment["graceful_shutdown_timeout_s"] = 5
    assert app["args"]["serving"]["priorityScheduling"] is True
    started = time.monotonic()
    with server.added(app):
        print(f"\nquota app (2 replicas) RUNNING after {time.monotonic() - started:.1f}s")
        yield Path(app["args"]["serving"]["keyPoliciesFile"])


@pytest.fixture
def policies_file(quota_app):
    """The policy file; whatever a test writes is put back after it (and re-read by the app)."""
    before = quota_app.read_text()
    yield quota_app
    if quota_app.read_text() != before:
        quota_app.write_text(before)
        time.sleep(vllm_app_quotas.Policies(None).reload_s + 1)


@pytest.fixture(scope="module")
def base_url(server, quota_app):
    return server.url + PREFIX


def chat(base_url, key, max_tokens=1, stream=False, **fields):
    return httpx.post(base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[key]}"},
                      timeout=120, json={"model": SERVED_NAME, "messages": HELLO, "max_tokens": max_tokens,
                                         "temperature": 0, "ignore_eos": True, "stream": stream, **fields})


def replica_logs(server) -> str:
    """The replicas' logs of every app on the local Ray (the quota app's name is in the file names)."""
    return "\n".join(path.read_text(errors="replace")
                     for path in (server.logs_dir / "serve").glob("replica_*.log"))


def quota_replica_logs(server) -> dict:
    return {path.name: path.read_text(errors="replace")
            for path in (server.logs_dir / "serve").glob(f"replica_{APP}_*.log")}


def assert_429(response, kind):
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["code"] == "rate_limit_exceeded" and error["param"] is None, error
    assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) > 0
    return error


class TestLimits:
    def test_requests_per_minute_should_hold_across_both_replicas_then_429_with_openais_body(self, base_url):
        statuses = []
        for _ in range(8):
            response = chat(base_url, "rpm")
            statuses.append(response.status_code)
            assert response.headers["x-ratelimit-limit-requests"] == "5"
        assert statuses == [200] * 5 + [429] * 3, statuses
        error = assert_429(response, "requests")
        assert "rpm" in error["message"] and "per minute" in error["message"]
        assert 40 <= int(response.headers["retry-after"]) <= 60  # the first of the 5 is a minute old then
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert re.fullmatch(r"\d+(\.\d+)?s|\d+ms|\d+m\d+s", response.headers["x-ratelimit-reset-requests"])

    def test_tokens_per_minute_should_count_prompt_and_completion(self, base_url):
        used, remaining = 0, []
        for _ in range(30):
            response = chat(base_url, "tpm", max_tokens=40)
            if response.status_code != 200:
                break
            usage = response.json()["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            used += usage["total_tokens"]
            time.sleep(0.05)  # the charge reaches the ledger after the answer
            remaining.append(int(response.headers["x-ratelimit-remaining-tokens"]))
        assert_429(response, "tokens")
        # The last admitted answer may pass the budget; a lease the other replica holds may be unspent.
        assert 300 - 2 * 5 <= used < 300 + 2 * 60, used
        # Each answer's headers are written before its own tokens are counted, and each replica
        # shows what it last heard from the ledger: falling, but not in lockstep.
        assert all(0 <= value <= 300 for value in remaining) and remaining[-1] < remaining[0], remaining

    def test_a_stream_past_the_token_budget_should_finish_and_be_charged_to_the_next_window(self, base_url):
        with httpx.stream("POST", base_url + "/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {KEYS['stream']}"},
                          json={"model": SERVED_NAME, "messages": HELLO, "max_tokens": 200, "temperature": 0,
                                "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}}) as response:
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-tokens"] == "50"
            frames = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "data: [DONE]"
        usage = yaml.safe_load(frames[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 200  # not cut at 50
        time.sleep(0.2)
        after = chat(base_url, "stream")
        assert_429(after, "tokens")
        assert int(after.headers["retry-after"]) >= 50  # the debt ages out a minute after the stream

    def test_a_concurrency_cap_should_be_exact_across_replicas(self, base_url):
        async def scenario():
            async with httpx.AsyncClient(base_url=base_url, timeout=120,
                                         headers={"Authorization": f"Bearer {KEYS['conc']}"}) as client:
                body = {"model": SERVED_NAME, "messages": HELLO, "max_tokens": 1500, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                held = []
                for _ in range(2):  # two long streams, held open
                    request = client.build_request("POST", "/v1/chat/completions", json=body)
                    response = await client.send(request, stream=True)
                    assert response.status_code == 200
                    lines = response.aiter_lines()
                    await lines.__anext__()
                    held.append((response, lines))
                refused = await asyncio.gather(*(client.post("/v1/chat/completions", json={**body, "stream": False,
                                                                                          "max_tokens": 1})
                                                 for _ in range(6)))
                for response, lines in held:
                    async for _ in lines:
                        pass
                    await response.aclose()
                await asyncio.sleep(0.3)  # the slots go back as the answers end
                after = await client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 1})
                return refused, after

        refused, after = asyncio.run(scenario())
        for response in refused:
            error = assert_429(response, "requests")
            assert "at most 2 requests in flight" in error["message"]
        assert after.status_code == 200, after.text

    def test_every_answer_of_a_limited_key_should_carry_the_headers(self, base_url):
        headers = {"Authorization": f"Bearer {KEYS['acc-rpm']}"}
        answers = [httpx.get(base_url + "/v1/models", headers=headers, timeout=60),
                   chat(base_url, "acc-rpm"),
                   chat(base_url, "acc-rpm", max_tokens=-1),  # vLLM's own 400
                   httpx.post(base_url + "/tokenize", headers=headers, json={"prompt": "hi"}, timeout=60)]
        assert [a.status_code for a in answers] == [200, 200, 400, 200]
        for answer in answers:
            assert answer.headers["x-ratelimit-limit-requests"] == str(ACCURACY_RPM), answer.request.url
            assert int(answer.headers["x-ratelimit-remaining-requests"]) <= ACCURACY_RPM
            assert "x-ratelimit-reset-requests" in answer.headers
            assert "x-ratelimit-limit-tokens" not in answer.headers  # no token limit for this key
        # GETs are free; each POST counts.
        assert int(answers[-1].headers["x-ratelimit-remaining-requests"]) < ACCURACY_RPM

    def test_a_key_without_limits_should_get_no_headers(self, base_url):
        response = chat(base_url, "unlimited")
        assert response.status_code == 200
        assert not [name for name in response.headers if name.startswith("x-ratelimit")]

    def test_a_key_with_a_priority_should_be_served(self, base_url):
        # The client's own priority is replaced by its key's (it could otherwise jump the queue).
        assert chat(base_url, "prio", priority=-1000).status_code == 200
        assert chat(base_url, "unlimited", priority=-1000).status_code == 200


class TestClients:
    def test_the_sdk_should_raise_rate_limit_error_with_the_body(self, base_url):
        with openai.OpenAI(base_url=base_url + "/v1", api_key=KEYS["rpm"], max_retries=0, timeout=60) as sdk:
            with pytest.raises(openai.RateLimitError) as failure:
                for _ in range(7):
                    sdk.chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=1)
        assert failure.value.code == "rate_limit_exceeded" and failure.value.type == "requests"

    def test_the_sdks_max_retries_should_wait_retry_after_and_then_succeed(self, base_url):
        """While another request of the key holds its one slot, the SDK's retries follow
        Retry-After (1 s) and get in once the slot is free."""
        holding = threading.Event()

        def hold_the_slot():  # a stream of a few seconds, read to its end
            with httpx.stream("POST", base_url + "/v1/chat/completions", timeout=120,
                              headers={"Authorization": f"Bearer {KEYS['sdk']}"},
                              json={"model": SERVED_NAME, "messages": HELLO, "max_tokens": 600,
                                    "ignore_eos": True, "stream": True}) as response:
                assert response.status_code == 200
                holding.set()
                for _ in response.iter_lines():
                    pass

        holder = threading.Thread(target=hold_the_slot)
        holder.start()
        assert holding.wait(60)
        attempts = []
        hook = {"response": [lambda response: attempts.append((time.monotonic(), response.status_code))]}
        try:
            with httpx.Client(event_hooks=hook) as http_client, openai.OpenAI(
                    base_url=base_url + "/v1", api_key=KEYS["sdk"], max_retries=60, timeout=60,
                    http_client=http_client) as sdk:
                answer = sdk.chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=1)
        finally:
            holder.join()
        assert answer.choices[0].message is not None
        assert attempts[0][1] == 429 and attempts[-1][1] == 200, attempts
        assert all(later - earlier >= 0.9 for (earlier, _), (later, _) in zip(attempts, attempts[1:])), attempts

    def test_the_sdk_should_wait_out_a_requests_per_minute_limit(self, base_url):
        """The Retry-After of a spent minute is up to 60 s, which the SDK still honours."""
        started = time.monotonic()
        with openai.OpenAI(base_url=base_url + "/v1", api_key=KEYS["sdk-rpm"], max_retries=2, timeout=90) as sdk:
            for _ in range(3):
                sdk.chat.completions.create(model=SERVED_NAME, messages=HELLO, max_tokens=1)
        assert 55 <= time.monotonic() - started <= 75


class TestLivePolicies:
    def test_a_quota_change_should_apply_without_a_restart(self, base_url, policies_file, server):
        def replica_ids():  # one log file per replica: a restarted replica would add one
            return set(quota_replica_logs(server))

        before = replica_ids()
        assert chat(base_url, "live").status_code == 200
        assert_429(chat(base_url, "live"), "requests")
        policies = yaml.safe_load(policies_file.read_text())
        policies["keyPolicies"]["live"] = {"requestsPerMinute": 100}
        policies_file.write_text(yaml.safe_dump(policies))  # what the kubelet does after helm upgrade
        deadline, statuses = time.monotonic() + 20, []
        while time.monotonic() < deadline:
            response = chat(base_url, "live")
            statuses.append(response.status_code)
            if response.status_code == 200 and response.headers["x-ratelimit-limit-requests"] == "100":
                break
            time.sleep(0.5)
        assert statuses[-1] == 200, statuses
        assert replica_ids() == before

    def test_a_policy_file_that_is_not_yaml_should_keep_the_old_policies_and_say_why(
            self, base_url, policies_file, server):
        assert chat(base_url, "bad-file").status_code == 200
        policies_file.write_text("keyPolicies: {bad-file: [not yaml")
        time.sleep(vllm_app_quotas.Policies(None).reload_s + 1)
        for _ in range(3):
            assert_429(chat(base_url, "bad-file"), "requests")  # still the old 1 per minute
        policies_file.write_text("keyPolicies: {bad-file: {requestsPerMinute: -3}}")
        time.sleep(vllm_app_quotas.Policies(None).reload_s + 1)
        assert_429(chat(base_url, "bad-file"), "requests")
        logs = "\n".join(quota_replica_logs(server).values())
        assert "are not applied: not YAML" in logs
        assert "keyPolicies.bad-file.requestsPerMinute: Input should be greater than or equal to 1" in logs


class TestLedger:
    def test_when_the_ledger_dies_replicas_should_keep_serving_under_their_share_and_log_it(self, base_url, server):
        import ray

        ledger = ray.get_actor(vllm_app_quotas.ledger_name(APP), namespace=vllm_app_quotas.LEDGER_NAMESPACE)
        assert chat(base_url, "death").status_code == 200
        ray.kill(ledger, no_restart=True)
        statuses = []
        for _ in range(40):
            statuses.append(chat(base_url, "death").status_code)
        served = statuses.count(200)
        # Not closed (it serves) and not open (it still refuses past about the limit: the two
        # replicas' shares of 20, what their last leases held, and one slice each of room).
        assert served >= 5 and 429 in statuses, statuses
        assert served <= 20 + 4, statuses
        logs = "\n".join(quota_replica_logs(server).values())
        assert "the quota ledger is unreachable" in logs and "share (1/2)" in logs
        # The replicas make a new ledger within RECONNECT_S and give it their last minute.
        deadline = time.monotonic() + 3 * vllm_app_quotas.RECONNECT_S
        while time.monotonic() < deadline and "reachable again" not in "\n".join(quota_replica_logs(server).values()):
            chat(base_url, "unlimited")
            chat(base_url, "death")
            time.sleep(1)
        assert "the quota ledger is reachable again" in "\n".join(quota_replica_logs(server).values())
        new_ledger = ray.get_actor(vllm_app_quotas.ledger_name(APP), namespace=vllm_app_quotas.LEDGER_NAMESPACE)
        assert ray.get(new_ledger.sync.remote("test", [], None, [], {}))["incarnation"]


class TestAccuracy:
    SECONDS = 60

    def test_two_replicas_should_hold_a_key_driven_at_3x_to_its_limits(self, base_url, server):
        """Over 60 s, keys sent at 3x their requests per minute and their tokens per minute get
        95-105% of each: the issue's target."""
        max_tokens = 20

        async def drive(client, key, per_second, results):
            started = time.monotonic()
            tasks, n = [], 0
            while time.monotonic() - started < self.SECONDS:
                tasks.append(asyncio.create_task(client.post(
                    "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS[key]}"},
                    json={"model": SERVED_NAME, "messages": HELLO, "max_tokens": max_tokens, "temperature": 0,
                          "ignore_eos": True})))
                n += 1
                await asyncio.sleep(max(0.0, started + n / per_second - time.monotonic()))
            for response in await asyncio.gather(*tasks):
                results.append(response)

        async def scenario():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
                requests_results, tokens_results = [], []
                # One request's tokens, to drive the token key at 3x.
                probe = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['unlimited']}"},
                                          json={"model": SERVED_NAME, "messages": HELLO, "max_tokens": max_tokens,
                                                "temperature": 0, "ignore_eos": True})
                per_request = probe.json()["usage"]["total_tokens"]
                await asyncio.gather(drive(client, "acc-rpm", 3 * ACCURACY_RPM / 60, requests_results),
                                     drive(client, "acc-tpm", 3 * ACCURACY_TPM / 60 / per_request, tokens_results))
                return requests_results, tokens_results, per_request

        started = time.time()
        requests_results, tokens_results, per_request = asyncio.run(scenario())
        served_requests = sum(r.status_code == 200 for r in requests_results)
        served_tokens = sum(r.json()["usage"]["total_tokens"] for r in tokens_results if r.status_code == 200)
        other = {r.status_code for r in requests_results + tokens_results} - {200, 429}
        share_requests = served_requests / ACCURACY_RPM
        share_tokens = served_tokens / ACCURACY_TPM
        logs = quota_replica_logs(server)
        per_replica = {name: len(re.findall(r"key=acc-(?:rpm|tpm) status=200", text)) for name, text in logs.items()}
        print(f"\naccuracy over {self.SECONDS}s from {time.ctime(started)}: requests {served_requests}/{ACCURACY_RPM} "
              f"= {share_requests:.1%} of {len(requests_results)} sent; tokens {served_tokens}/{ACCURACY_TPM} = "
              f"{share_tokens:.1%} of {len(tokens_results)} requests of {per_request} tokens; "
              f"served per replica: {per_replica}")
        assert not other, other
        assert sum(1 for count in per_replica.values() if count) == 2, per_replica  # both replicas served
        assert 0.95 <= share_requests <= 1.05
        assert 0.95 <= share_tokens <= 1.05

"""Unit tests of the quota machinery (files/vllm_app_quotas.py): the policy file, the ledger's
sliding-window arithmetic, leases, debts and concurrency slots, the replica's admission and
headers, the ledger's death, and the gate's 429. A fake clock drives time; no Ray, no engine."""

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

FILES = Path(__file__).resolve().parents[2] / "files"
sys.path.insert(0, str(FILES))
import vllm_app  # noqa: E402
import vllm_app_quotas as quotas  # noqa: E402


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def run(coroutine):
    return asyncio.new_event_loop().run_until_complete(coroutine)


def policies_file(tmp_path, text):
    path = tmp_path / "key_policies.yaml"
    path.write_text(text)
    return path


class TestPolicyFile:
    def test_should_read_named_and_default_policies(self, tmp_path):
        path = policies_file(tmp_path, "keyPolicies:\n  team-a: {requestsPerMinute: 60, priority: -1}\n"
                                       "defaultKeyPolicy: {tokensPerMinute: 1000}\n")
        policies = quotas.Policies(str(path))
        assert policies.for_key("team-a").requests_per_minute == 60
        assert policies.for_key("team-a").tokens_per_minute is None  # unset: unlimited
        assert policies.for_key("anyone").tokens_per_minute == 1000
        assert policies.current.any_priority

    def test_an_empty_file_should_mean_no_limits(self, tmp_path):
        policies = quotas.Policies(str(policies_file(tmp_path, "")))
        assert policies.for_key("x") == quotas.KeyPolicy()

    @pytest.mark.parametrize("text, named", [
        ("keyPolicies: {team-a: {requestsPerMinute: -5}}", "key_policies.team-a.requestsPerMinute"),
        ("keyPolicies: {team-a: {tokensPerMinute: 100000000000000}}", "key_policies.team-a.tokensPerMinute"),
        ("keyPolicies: {team-a: {maxConcurrent: 0}}", "key_policies.team-a.maxConcurrent"),
        ("keyPolicies: {team-a: {priority: true}}", "key_policies.team-a.priority"),
        ("keyPolicies: {team-a: {requestsPerMinute: '60'}}", "key_policies.team-a.requestsPerMinute"),
        ("keyPolicies: {team-a: {rpm: 60}}", "key_policies.team-a.rpm"),
        ("defaultKeyPolicy: {requestsPerMinute: 1.5}", "default_key_policy.requestsPerMinute"),
        ("keyPolicies: [1, 2", "not YAML"),
        ("just a string", "expected a map"),
    ])
    def test_a_bad_file_should_be_refused_naming_the_problem_and_keep_the_old_policies(
            self, tmp_path, caplog, text, named):
        clock = Clock()
        path = policies_file(tmp_path, "keyPolicies: {team-a: {requestsPerMinute: 60}}")
        policies = quotas.Policies(str(path), reload_s=5, clock=clock)
        path.write_text(text)
        clock.advance(6)
        with caplog.at_level("ERROR", logger="ray.serve"):
            assert policies.for_key("team-a").requests_per_minute == 60
        assert named.replace("key_policies", "keyPolicies").replace("default_key_policy", "defaultKeyPolicy") \
            in caplog.text or named in caplog.text, caplog.text
        assert "previous policies stay in force" in caplog.text
        # Said once, not at every re-read.
        clock.advance(6)
        caplog.clear()
        with caplog.at_level("ERROR", logger="ray.serve"):
            policies.for_key("team-a")
        assert caplog.text == ""

    def test_a_change_should_apply_at_the_next_reread_without_a_restart(self, tmp_path):
        clock = Clock()
        path = policies_file(tmp_path, "keyPolicies: {team-a: {requestsPerMinute: 60}}")
        policies = quotas.Policies(str(path), reload_s=5, clock=clock)
        path.write_text("keyPolicies: {team-a: {requestsPerMinute: 10}}")
        clock.advance(1)
        assert policies.for_key("team-a").requests_per_minute == 60  # not yet due
        clock.advance(5)
        assert policies.for_key("team-a").requests_per_minute == 10

    def test_the_schema_and_the_app_should_share_the_bounds(self):
        schema = json.loads((FILES.parent / "values.schema.json").read_text())["definitions"]["keyPolicy"]["properties"]
        for field, model_field in quotas.KeyPolicy.model_fields.items():
            bounds = {meta.__class__.__name__: meta for meta in model_field.metadata}
            node = schema[model_field.alias]
            assert node["minimum"] == bounds["Ge"].ge and node["maximum"] == bounds["Le"].le, field


class TestLedger:
    def ask(self, key="k", kind="requests", limit=10, want=0, charge=0, give_back=0):
        return {"key": key, "kind": kind, "limit": limit, "want": want, "charge": charge, "give_back": give_back}

    def new(self, clock):
        ledger = quotas.Ledger(clock=clock)
        # A replica's first call carries its (empty) history.
        ledger.sync("r1", [], None, [], {})
        return ledger

    def sync(self, ledger, *asks, replica="r1"):
        return ledger.sync(replica, list(asks), ledger.incarnation)

    def test_grants_should_never_pass_the_limit_within_a_window(self):
        clock = Clock()
        ledger = self.new(clock)
        granted = 0
        for _ in range(30):
            granted += self.sync(ledger, self.ask(want=3))["answers"][0]["granted"]
            clock.advance(1)
        assert granted == 10

    def test_the_window_should_slide(self):
        clock = Clock()
        ledger = self.new(clock)
        assert self.sync(ledger, self.ask(want=10))["answers"][0]["granted"] == 10
        clock.advance(59.9)
        answer = self.sync(ledger, self.ask(want=1))["answers"][0]
        assert answer["granted"] == 0 and answer["free_in"] == pytest.approx(0.1)
        clock.advance(0.1)
        assert self.sync(ledger, self.ask(want=10))["answers"][0]["granted"] == 10

    def test_free_in_should_be_when_enough_old_spending_ages_out(self):
        clock = Clock()
        ledger = self.new(clock)
        self.sync(ledger, self.ask(want=4))
        clock.advance(10)
        self.sync(ledger, self.ask(want=6))
        clock.advance(5)
        answer = self.sync(ledger, self.ask(want=1))["answers"][0]
        assert answer["free_in"] == pytest.approx(45)  # the first 4 age out at t=60
        assert answer["empty_in"] == pytest.approx(55)  # the last 6 at t=70

    def test_a_charge_past_the_limit_should_be_a_debt_the_next_window_pays(self):
        clock = Clock()
        ledger = self.new(clock)
        self.sync(ledger, self.ask(kind="tokens", limit=100, want=100))
        answer = self.sync(ledger, self.ask(kind="tokens", limit=100, charge=50))["answers"][0]
        assert answer["used"] == 150
        clock.advance(30)
        assert self.sync(ledger, self.ask(kind="tokens", limit=100, want=10))["answers"][0]["granted"] == 0
        clock.advance(30)  # the grant and the debt are a minute old
        assert self.sync(ledger, self.ask(kind="tokens", limit=100, want=10))["answers"][0]["granted"] == 10

    def test_a_give_back_should_come_off_the_latest_grants(self):
        clock = Clock()
        ledger = self.new(clock)
        self.sync(ledger, self.ask(want=6))
        clock.advance(1)
        self.sync(ledger, self.ask(want=4))
        answer = self.sync(ledger, self.ask(give_back=5))["answers"][0]
        assert answer["used"] == 5
        clock.advance(59.5)  # the first grant (now 5 of 6 left... of which 1 given back) ages out
        assert ledger.used("k", "requests") == 0

    def test_two_replicas_should_share_one_limit(self):
        clock = Clock()
        ledger = self.new(clock)
        ledger.sync("r2", [], None, [], {})
        total = 0
        for _ in range(20):
            for replica in ("r1", "r2"):
                total += self.sync(ledger, self.ask(want=2, limit=25), replica=replica)["answers"][0]["granted"]
        assert total == 25
        assert ledger.replicas() == 2

    def test_concurrency_slots_should_be_exact_across_replicas(self):
        ledger = self.new(Clock())
        assert [ledger.acquire_slot(r, "k", 3) for r in ("r1", "r2", "r1", "r2")] == [True, True, True, False]
        ledger.release_slot("r2", "k")
        assert ledger.acquire_slot("r1", "k", 3) and not ledger.acquire_slot("r2", "k", 3)

    def test_a_silent_replicas_slots_should_go_back(self):
        clock = Clock()
        ledger = self.new(clock)
        ledger.sync("r2", [], None, [], {})
        assert ledger.acquire_slot("r2", "k", 1)
        clock.advance(31)
        self.sync(ledger)  # r1 is alive; r2 has said nothing for 31 s
        assert ledger.acquire_slot("r1", "k", 1)

    def test_a_new_ledger_should_ask_for_history_and_take_it(self):
        clock = Clock()
        ledger = quotas.Ledger(clock=clock)
        assert ledger.sync("r1", [self.ask(want=1)], "an-old-incarnation")["need_history"]
        assert ledger.sync("r1", [self.ask(want=1)], None)["need_history"]
        answer = ledger.sync("r1", [self.ask(want=10)], None, [("k", "requests", 30.0, 7)], {"k": 2})
        assert answer["answers"][0]["granted"] == 3 and ledger.slots_held("k") == 2
        clock.advance(30)
        assert ledger.used("k", "requests") == 3  # the seeded 7 were 30 s old


def quota_set(tmp_path, text, clock, connect=None, replica="r1", **kwargs):
    policies = quotas.Policies(str(policies_file(tmp_path, text)), clock=clock)
    return quotas.Quotas(policies, replica, connect=connect, clock=clock, background=False, **kwargs)


class FakeActor:
    """A Ray actor handle's shape over a real Ledger: `.method.remote(...)` returns an awaitable."""

    def __init__(self, ledger):
        self.ledger, self.dead = ledger, False

    def __getattr__(self, name):
        actor = self

        class Method:
            @staticmethod
            def remote(*args):
                if name == "release_slot":  # Ray's returns at once; nobody awaits it
                    return getattr(actor.ledger, name)(*args)

                async def call():
                    if actor.dead:
                        raise RuntimeError("The actor died unexpectedly before finishing this task.")
                    return getattr(actor.ledger, name)(*args)
                return call()

        return Method()


class TestReplicaAdmission:
    def test_a_key_should_get_its_limit_and_then_429_with_the_time_to_wait(self, tmp_path):
        async def scenario():
            clock = Clock()
            q = quota_set(tmp_path, "keyPolicies: {a: {requestsPerMinute: 6}}", clock)
            outcomes = []
            for _ in range(10):
                admission = await q.admit("a")
                outcomes.append(admission.refused)
                if not admission.refused:
                    admission.done(0)
                await q.sync_once()
                clock.advance(0.5)
            refused = await q.admit("a")
            await q.close()
            return outcomes, refused

        outcomes, refused = run(scenario())
        assert outcomes == [None] * 6 + ["requests"] * 4
        assert 54 < refused.retry_after_s <= 60  # the first request ages out at t=60
        headers = dict(refused.headers)
        assert headers[b"x-ratelimit-limit-requests"] == b"6" and headers[b"x-ratelimit-remaining-requests"] == b"0"
        assert dict(refused.retry_headers())[b"retry-after"] == str(int(-(-refused.retry_after_s // 1))).encode()

    def test_tokens_should_be_charged_after_the_answer_and_a_stream_past_the_budget_not_cut(self, tmp_path):
        async def scenario():
            clock = Clock()
            q = quota_set(tmp_path, "keyPolicies: {a: {tokensPerMinute: 100}}", clock)
            first = await q.admit("a")
            first.done(80)
            await q.sync_once()
            second = await q.admit("a")  # 20 left: admitted, and it uses 300
            second.done(300)
            await q.sync_once()
            third = await q.admit("a")
            clock.advance(59)
            await q.sync_once()
            fourth = await q.admit("a")  # the debt is not a minute old yet
            clock.advance(2)
            await q.sync_once()
            fifth = await q.admit("a")
            await q.close()
            return second, third, fourth, fifth

        second, third, fourth, fifth = run(scenario())
        assert second.refused is None
        assert third.refused == "tokens" and fourth.refused == "tokens"
        assert fifth.refused is None

    def test_unlimited_keys_should_get_no_headers_and_no_ledger_calls(self, tmp_path):
        async def scenario():
            q = quota_set(tmp_path, "keyPolicies: {a: {requestsPerMinute: 6}}", Clock())
            admission = await q.admit("b")
            return admission, q._task

        admission, task = run(scenario())
        assert admission.headers == [] and admission.refused is None and task is None

    def test_headers_should_count_down_and_reset_in_openais_format(self, tmp_path):
        async def scenario():
            clock = Clock()
            q = quota_set(tmp_path, "defaultKeyPolicy: {requestsPerMinute: 120, tokensPerMinute: 6000}", clock)
            seen = []
            for _ in range(3):
                admission = await q.admit("anyone")
                admission.done(100)
                await q.sync_once()
                seen.append(dict(admission.headers))
                clock.advance(1)
            await q.close()
            return seen

        seen = run(scenario())
        remaining = [int(h[b"x-ratelimit-remaining-requests"]) for h in seen]
        assert remaining == sorted(remaining, reverse=True) and remaining[0] <= 119
        assert all(h[b"x-ratelimit-limit-tokens"] == b"6000" for h in seen)
        assert seen[-1][b"x-ratelimit-reset-requests"].endswith(b"s")

    @pytest.mark.parametrize("seconds, text", [(0.02, "20ms"), (1.5, "1.5s"), (59.9994, "59.999s"), (360, "6m0s")])
    def test_reset_durations_should_read_like_openais(self, seconds, text):
        assert quotas.reset_text(seconds) == text

    def test_two_replicas_should_share_one_limit_through_the_ledger(self, tmp_path):
        async def scenario():
            clock = Clock()
            actor = FakeActor(quotas.Ledger(clock=clock))
            replicas = [quota_set(tmp_path, "keyPolicies: {a: {requestsPerMinute: 60}}", clock,
                                  connect=lambda: actor, replica=f"r{i}") for i in range(2)]
            admitted = 0
            for step in range(600):  # 60 s at 10 requests a second: 10x the limit
                admission = await replicas[step % 2].admit("a")
                if not admission.refused:
                    admitted += 1
                    admission.done(0)
                if step % 2:
                    for q in replicas:
                        await q.sync_once()
                clock.advance(0.1)
            for q in replicas:
                await q.close()
            return admitted

        assert 57 <= run(scenario()) <= 63

    def test_a_keys_first_request_at_each_replica_should_not_pass_a_spent_limit(self, tmp_path):
        async def scenario():
            clock = Clock()
            actor = FakeActor(quotas.Ledger(clock=clock))
            r1, r2 = (quota_set(tmp_path, "keyPolicies: {a: {requestsPerMinute: 1}}", clock, connect=lambda: actor,
                                replica=name) for name in ("r1", "r2"))
            first = await r1.admit("a")
            first.done(0)
            await r1.sync_once()
            return first, await r2.admit("a"), await r1.admit("a")

        assert [a.refused for a in run(scenario())] == [None, "requests", "requests"]

    def test_a_concurrency_cap_should_hold_across_replicas(self, tmp_path):
        async def scenario():
            clock = Clock()
            actor = FakeActor(quotas.Ledger(clock=clock))
            r1, r2 = (quota_set(tmp_path, "keyPolicies: {a: {maxConcurrent: 2}}", clock, connect=lambda: actor,
                                replica=name) for name in ("r1", "r2"))
            first, second, third = await r1.admit("a"), await r2.admit("a"), await r2.admit("a")
            first.done(0)
            fourth = await r2.admit("a")
            return first, second, third, fourth

        first, second, third, fourth = run(scenario())
        assert (first.refused, second.refused, third.refused, fourth.refused) == (None, None, "requests", None)

    def test_when_the_ledger_dies_the_replica_should_enforce_its_share_and_say_so(self, tmp_path, caplog):
        async def scenario():
            clock = Clock()
            actor = FakeActor(quotas.Ledger(clock=clock))
            r1, r2 = (quota_set(tmp_path, "keyPolicies: {a: {requestsPerMinute: 60}}", clock, connect=lambda: actor,
                                replica=name) for name in ("r1", "r2"))
            for _ in range(2):  # their heartbeats: each learns that there are two
                for q in (r1, r2):
                    await q.sync_once()
            actor.dead = True
            admitted = 0
            for _ in range(200):  # 20 s at 10 a second, all on r1
                admission = await r1.admit("a")
                if not admission.refused:
                    admitted += 1
                    admission.done(0)
                await r1.sync_once()
                clock.advance(0.1)
            return admitted, r1.ledger_ok

        with caplog.at_level("WARNING", logger="ray.serve"):
            admitted, ok = run(scenario())
        assert not ok
        assert "quota ledger is unreachable" in caplog.text and "share (1/2)" in caplog.text
        assert caplog.text.count("quota ledger is unreachable") == 1  # once, not at every retry
        # Neither closed (nothing admitted) nor open (200): about half the limit, plus the last lease.
        assert 25 <= admitted <= 35, admitted

    def test_the_first_request_after_the_ledger_dies_should_not_be_refused_for_it(self, tmp_path):
        async def scenario():
            clock = Clock()
            actor = FakeActor(quotas.Ledger(clock=clock))
            q = quota_set(tmp_path, "keyPolicies: {a: {requestsPerMinute: 10}}", clock, connect=lambda: actor)
            (await q.admit("a")).done(0)
            actor.dead = True
            return await q.admit("a")

        assert run(scenario()).refused is None

    def test_a_restarted_ledger_should_be_given_the_last_minute(self, tmp_path):
        async def scenario():
            clock = Clock()
            actor = FakeActor(quotas.Ledger(clock=clock))
            q = quota_set(tmp_path, "keyPolicies: {a: {requestsPerMinute: 10}}", clock, connect=lambda: actor)
            for _ in range(8):
                (await q.admit("a")).done(0)
                await q.sync_once()
            actor.ledger = quotas.Ledger(clock=clock)  # Ray restarted it: empty
            await q.sync_once()  # told to send its history
            await q.sync_once()
            return actor.ledger.used("a", "requests")

        assert run(scenario()) >= 8


class TestGate:
    KEY = "k-123"

    def _gate(self, tmp_path, text, inner_status=200):
        async def inner(scope, receive, send):
            await send({"type": "http.response.start", "status": inner_status, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        # As in a replica: the background sync runs, with an in-process ledger.
        q = quotas.Quotas(quotas.Policies(str(policies_file(tmp_path, text))), "r1")
        return vllm_app.Gate(inner, vllm_app.APIKeys({"default": self.KEY}), False, quotas=q)

    def _post(self, gate):
        async def go():
            transport = httpx.ASGITransport(app=gate)
            responses = []
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for _ in range(3):
                    responses.append(await client.post("/tokenize", json={},
                                                       headers={"Authorization": f"Bearer {self.KEY}"}))
                    await asyncio.sleep(0.1)  # the replica's sync runs between requests
            await gate.quotas.close()
            return responses
        return asyncio.new_event_loop().run_until_complete(go())

    def test_over_the_limit_should_get_openais_429_with_retry_after(self, tmp_path):
        responses = self._post(self._gate(tmp_path, "keyPolicies: {default: {requestsPerMinute: 2}}"))
        assert [r.status_code for r in responses] == [200, 200, 429]
        error = responses[2].json()["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and error["param"] is None
        assert "default" in error["message"]
        assert 1 <= int(responses[2].headers["retry-after"]) <= 60 and "retry-after-ms" in responses[2].headers
        for response in responses:
            assert response.headers["x-ratelimit-limit-requests"] == "2"
        assert [r.headers["x-ratelimit-remaining-requests"] for r in responses] == ["1", "0", "0"]


class TestEnginePriority:
    def _served_priority(self, record_priority, client_priority):
        from types import SimpleNamespace

        seen = []

        class Engine:
            model_config = SimpleNamespace(served_model_name="chat")

            async def generate(self, prompt, sampling_params, request_id, **kwargs):
                seen.append(kwargs.get("priority"))
                yield SimpleNamespace(prompt_token_ids=[1], finished=True, outputs=[SimpleNamespace(token_ids=[2])])

        engine = vllm_app._metered(Engine)()

        async def serve():
            record = vllm_app.RequestRecord("r", "POST", "/v1/chat/completions")
            record.priority = record_priority
            token = vllm_app._current_request.set(record)
            try:
                async for _ in engine.generate("p", SimpleNamespace(), "r", priority=client_priority):
                    pass
            finally:
                vllm_app._current_request.reset(token)

        asyncio.run(serve())
        return seen[0]

    def test_the_keys_priority_should_replace_the_clients(self):
        assert self._served_priority(5, -1000) == 5
        assert self._served_priority(0, -1000) == 0  # a key without one: 0, not what the client asked

    def test_without_priority_scheduling_the_client_priority_should_reach_vllm(self):
        assert self._served_priority(None, 3) == 3  # vLLM then refuses it with its own 400

    def test_priority_scheduling_should_give_every_key_its_policys_priority_or_0(self, tmp_path):
        async def scenario():
            q = quota_set(tmp_path, "keyPolicies: {batch: {priority: 10}}", Clock(), priority_scheduling=True)
            return (await q.admit("batch")).priority, (await q.admit("other")).priority

        assert run(scenario()) == (10, 0)


def test_two_configs_rendered_for_one_server_should_not_share_a_policy_file():
    """An app added to a running server is rendered with that server's port; its policies must not
    replace the server's (they did, when the file's folder was named after the port)."""
    from tools import serve_local

    throttled = {"serving": {"keyPolicies": {"throttled": {"requestsPerMinute": 1}}}}
    first, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model="org/model", port=23456,
                                              values=throttled)
    second, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model="org/model", port=23456)
    [first_file] = {app["args"]["serving"]["keyPoliciesFile"] for app in first["applications"]}
    [second_file] = {app["args"]["serving"]["keyPoliciesFile"] for app in second["applications"]}
    assert first_file != second_file
    assert quotas.parse_policies(Path(first_file).read_text()).key_policies["throttled"].requests_per_minute == 1
    assert quotas.parse_policies(Path(second_file).read_text()).key_policies == {}

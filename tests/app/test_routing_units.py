"""The routing policy of serving.routing (files/vllm_app_routing.py, sections 1 to 4), in units:
no Ray, no engine. What a user would notice: a tenant's turns stay on one replica, a short shared
greeting does not pin anyone, a flood of one prefix spreads once the guard trips, a session
follows its header or `user`, an adapter goes where it is loaded, a replica that leaves is
forgotten."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "files"))
import vllm_app_routing as routing  # noqa: E402
from vllm_app_routing import AffinityPolicy, LoadEstimate, ReplicaView, RouteKey, RoutingArgs  # noqa: E402

SYSTEM = {tenant: f"You are the assistant of tenant {tenant}. " + "".join(f"Rule {tenant}-{n} applies. " for n in range(60))
          for tenant in "ABCDEFGH"}


def chat(tenant: str, *turns: str, user: str = "", model: str = "base") -> bytes:
    messages = [{"role": "system", "content": SYSTEM[tenant]}]
    messages += [{"role": "user", "content": turn} for turn in turns]
    return json.dumps({"model": model, "messages": messages, "user": user}).encode()


def replicas(*loads, adapters=None):
    adapters = adapters or {}
    return [ReplicaView(f"r{i}", load, frozenset(adapters.get(f"r{i}", ()))) for i, load in enumerate(loads)]


def policy(**values):
    return AffinityPolicy(RoutingArgs.model_validate({"mode": "prefix", **values}))


class TestRouteKey:
    def test_should_read_the_messages_in_order_with_their_roles(self):
        key = routing.route_key(chat("A", "hi"))
        assert key.text.index("Rule A-") < key.text.index("hi")
        assert "system" in key.text and "user" in key.text

    def test_should_read_a_completion_prompt_and_content_parts(self):
        assert routing.route_key(json.dumps({"prompt": "Once upon"}).encode()).text == "Once upon"
        assert routing.route_key(json.dumps({"prompt": ["one", "two"]}).encode()).text == "one"
        parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url"}]}]}
        assert routing.route_key(json.dumps(parts).encode()).text.endswith("look")

    def test_should_take_the_session_from_the_header_before_the_user_field(self):
        assert routing.route_key(chat("A", "hi", user="alice")).session == "alice"
        assert routing.route_key(chat("A", "hi", user="alice"), "s-1").session == "s-1"

    def test_should_name_an_adapter_only_when_it_is_not_the_base_model(self):
        assert routing.route_key(chat("A", "hi", model="base"), base_model="base").adapter == ""
        assert routing.route_key(chat("A", "hi", model="sql-lora"), base_model="base").adapter == "sql-lora"

    @pytest.mark.parametrize("body", [b"", b"not json", b'{"messages": [{"role": "us', b"[1, 2]"])
    def test_should_route_a_cut_or_odd_body_on_the_session_alone(self, body):
        assert routing.route_key(body, "s-9") == RouteKey(session="s-9")


class TestPrefixAffinity:
    def test_should_keep_a_tenants_turns_on_one_replica(self):
        chooser, views = policy(), replicas(0, 0, 0)
        first = chooser.choose(routing.route_key(chat("A", "q1")), views)
        for turn in range(2, 8):
            decision = chooser.choose(routing.route_key(chat("A", *[f"q{n}" for n in range(1, turn + 1)])), views)
            assert decision.replica == first.replica, decision
            assert decision.reason == "prefix" and decision.matched_chars >= 512

    def test_should_place_new_tenants_across_replicas(self):
        chooser, views = policy(), replicas(0, 0)
        homes = {tenant: chooser.choose(routing.route_key(chat(tenant, "hi")), views).replica for tenant in SYSTEM}
        assert set(homes.values()) == {"r0", "r1"}, homes

    def test_should_agree_between_two_routers_on_a_new_prefix(self):
        # Two router replicas, each with its own index, must send a new tenant to the same replica.
        views = replicas(1, 1, 1)
        for tenant in SYSTEM:
            key = routing.route_key(chat(tenant, "hi"))
            assert policy().choose(key, views).replica == policy().choose(key, views).replica

    def test_should_not_keep_together_prompts_sharing_less_than_the_minimum(self):
        chooser, views = policy(prefix_min_match_chars=4096), replicas(0, 0)
        decision = chooser.choose(routing.route_key(chat("A", "q1")), views)
        assert decision.reason == "least-loaded"
        # The shared part is shorter than the minimum: the next prompt goes by load, not by prefix.
        views[int(decision.replica[1])].load = 1
        assert chooser.choose(routing.route_key(chat("A", "q2")), views).replica != decision.replica

    def test_should_count_only_whole_leading_blocks(self):
        index = routing.PrefixIndex(block_chars=100, max_blocks=1000)
        index.insert(index.hashes("a" * 250), "r0")
        assert index.matches(index.hashes("a" * 200 + "b" * 100), {"r0"}) == {"r0": 200}
        assert index.matches(index.hashes("b" + "a" * 299), {"r0"}) == {}

    def test_should_forget_the_least_recently_used_blocks(self):
        index = routing.PrefixIndex(block_chars=10, max_blocks=1000)
        index.insert(index.hashes("x" * 10_000), "r0")
        index.insert(index.hashes("y" * 5_000), "r1")
        assert len(index) == 1000
        assert index.matches(index.hashes("y" * 5_000), {"r0", "r1"}) == {"r1": 5_000}
        assert index.matches(index.hashes("x" * 10_000), {"r0", "r1"}) == {}


class TestLoadGuard:
    def test_should_spread_a_flood_of_one_prefix_once_the_guard_trips(self):
        chooser, views = policy(max_imbalance=2), replicas(0, 0)
        loads = LoadEstimate()
        sent = Counter()
        for n in range(20):  # twenty requests in flight at once, all with tenant A's prompt
            for view in views:
                view.load = loads.load(view.id)
            decision = chooser.choose(routing.route_key(chat("A", f"user {n}")), views)
            loads.sent(decision.replica, at=n)
            sent[decision.replica] += 1
        assert abs(sent["r0"] - sent["r1"]) <= 3, sent
        # Once spread, both hold the prefix, and each new request takes the less loaded of them.
        views[0].load, views[1].load = 1, 0
        decision = chooser.choose(routing.route_key(chat("A", "next")), views)
        assert (decision.replica, decision.reason) == ("r1", "prefix")
        views[0].load, views[1].load = 0, 1
        assert chooser.choose(routing.route_key(chat("A", "again")), views).replica == "r0"

    def test_should_leave_a_replica_over_the_guard_even_when_it_holds_the_prefix(self):
        chooser = policy(max_imbalance=4)
        home = chooser.choose(routing.route_key(chat("A", "q1")), replicas(0, 0)).replica
        loads = [0, 0]
        loads[int(home[1])] = 5
        decision = chooser.choose(routing.route_key(chat("A", "q2")), replicas(*loads))
        assert decision.replica != home and decision.reason == "guard"

    def test_should_keep_affinity_within_the_guard(self):
        chooser = policy(max_imbalance=4)
        home = chooser.choose(routing.route_key(chat("A", "q1")), replicas(0, 0)).replica
        loads = [0, 0]
        loads[int(home[1])] = 4
        assert chooser.choose(routing.route_key(chat("A", "q2")), replicas(*loads)).replica == home

    def test_should_balance_prompts_without_shared_prefixes_by_load(self):
        chooser, views = policy(), replicas(0, 0)
        loads = LoadEstimate()
        sent = Counter()
        for n in range(100):
            for view in views:
                view.load = loads.load(view.id)
            decision = chooser.choose(routing.route_key(json.dumps({"prompt": f"{n} unrelated"}).encode()), views)
            loads.sent(decision.replica, at=n)
            sent[decision.replica] += 1
        assert sent == {"r0": 50, "r1": 50}

    def test_load_estimate_should_add_the_sends_the_last_count_cannot_include(self):
        loads = LoadEstimate(transit_s=0.1)
        loads.observe("r0", 3, at=10.0)
        loads.sent("r0", at=10.5)
        loads.sent("r0", at=10.6)
        assert loads.load("r0") == 5  # two sent since the count of 3
        loads.observe("r0", 3, at=9.0)  # an older count changes nothing
        assert loads.load("r0") == 5
        loads.observe("r0", 4, at=10.65)  # a count taken just after: the last send may be in transit
        assert loads.load("r0") == 5
        loads.observe("r0", 1, at=11.0)  # later: the replica counts them itself, or they are done
        assert loads.load("r0") == 1

    def test_sequential_short_requests_should_not_trip_the_guard(self):
        # One client, one request after the other: each count, taken before each decision, shows
        # the replica idle again; only the last send may still be in transit. So affinity holds
        # however fast the requests are, for any guard of 1 or more.
        chooser, loads = policy(max_imbalance=1), LoadEstimate()
        homes = set()
        for n in range(10):
            now = n * 0.05
            for replica in ("r0", "r1"):
                loads.observe(replica, 0, at=now)
            views = [ReplicaView(r, loads.load(r)) for r in ("r0", "r1")]
            decision = chooser.choose(routing.route_key(chat("A", f"q{n}")), views)
            loads.sent(decision.replica, at=now + 0.001)
            homes.add(decision.replica)
        assert len(homes) == 1


class TestSessionAffinity:
    def session_policy(self, **values):
        return AffinityPolicy(RoutingArgs.model_validate({"mode": "session", **values}))

    def test_should_keep_a_session_on_one_replica_and_spread_sessions(self):
        chooser, views = self.session_policy(), replicas(0, 0, 0)
        homes = {}
        for session in map(str, range(30)):
            for turn in range(3):
                decision = chooser.choose(RouteKey(text=f"turn {turn}", session=session), views)
                assert homes.setdefault(session, decision.replica) == decision.replica
        assert set(homes.values()) == {"r0", "r1", "r2"}

    def test_should_move_a_session_over_the_guard_and_keep_it_where_it_went(self):
        chooser = self.session_policy(max_imbalance=1)
        home = chooser.choose(RouteKey(session="s"), replicas(0, 0)).replica
        busy = [0, 0]
        busy[int(home[1])] = 3
        moved = chooser.choose(RouteKey(session="s"), replicas(*busy))
        assert moved.replica != home and moved.reason == "guard"
        assert chooser.choose(RouteKey(session="s"), replicas(0, 0)).replica == moved.replica

    def test_should_balance_requests_without_a_session(self):
        chooser = self.session_policy()
        assert chooser.choose(RouteKey(text="x"), replicas(3, 1)).replica == "r1"

    def test_should_move_only_the_sessions_of_a_replica_that_left(self):
        chooser = self.session_policy()
        before = {s: chooser.choose(RouteKey(session=s), replicas(0, 0, 0)).replica for s in map(str, range(60))}
        after = {s: chooser.choose(RouteKey(session=s), replicas(0, 0)).replica for s in map(str, range(60))}
        assert all(after[s] == home for s, home in before.items() if home != "r2")


class TestAdapterAffinity:
    def test_should_prefer_replicas_holding_the_adapter(self):
        chooser = policy()
        views = replicas(0, 2, adapters={"r1": {"sql-lora"}})
        key = RouteKey(text="short", adapter="sql-lora")
        assert chooser.choose(key, views).replica == "r1"

    def test_should_go_elsewhere_when_the_holder_is_over_the_guard(self):
        chooser = policy(max_imbalance=2)
        views = replicas(0, 3, adapters={"r1": {"sql-lora"}})
        assert chooser.choose(RouteKey(text="short", adapter="sql-lora"), views).replica == "r0"

    def test_should_be_off_when_not_asked_for(self):
        chooser = policy(adapter_affinity=False)
        views = replicas(0, 2, adapters={"r1": {"sql-lora"}})
        assert chooser.choose(RouteKey(text="short", adapter="sql-lora"), views).replica == "r0"

    def test_should_combine_with_prefix_affinity_among_the_holders(self):
        chooser = policy()
        views = replicas(0, 0, 0, adapters={"r1": {"a"}, "r2": {"a"}})
        homes = {chooser.choose(routing.route_key(chat(t, "hi", model="a"), base_model="base"), views).replica
                 for t in SYSTEM}
        assert homes <= {"r1", "r2"}


class TestFallback:
    def test_should_forget_a_replica_that_left(self):
        chooser = policy()
        home = chooser.choose(routing.route_key(chat("A", "q1")), replicas(0, 0)).replica
        chooser.forget(home)
        others = [view for view in replicas(0, 0) if view.id != home]
        assert chooser.choose(routing.route_key(chat("A", "q2")), others).replica != home

    def test_should_balance_by_load_when_the_request_has_no_key(self):
        assert policy().choose(RouteKey(), replicas(2, 0, 1)).replica == "r1"

    def test_should_refuse_an_empty_replica_set(self):
        with pytest.raises(ValueError):
            policy().choose(RouteKey(), [])


class TestArgs:
    def test_default_is_leastconn_and_unrouted(self):
        assert not RoutingArgs().routed

    def test_should_refuse_unknown_keys_and_modes(self):
        with pytest.raises(ValueError):
            RoutingArgs.model_validate({"mode": "random"})
        with pytest.raises(ValueError):
            RoutingArgs.model_validate({"minMatch": 3})

    def test_should_give_serve_a_request_router_config(self):
        config = routing.request_router_config(RoutingArgs(mode="prefix"))
        assert config["request_router_class"] == "vllm_app_routing:AffinityRequestRouter"
        assert RoutingArgs.model_validate(config["request_router_kwargs"]).mode == "prefix"


# -- Serve's side, with stand-ins for Serve's objects (the live test runs the real ones) --------


class _ReplicaId:
    def __init__(self, name):
        self.name = name

    def to_full_id_str(self):
        return f"SERVE_REPLICA::app#VLLMServer#{self.name}"


class _Replica:
    def __init__(self, name, stats=None, queue=None):
        self.replica_id, self.routing_stats = _ReplicaId(name), stats or {}
        self.backend_http_endpoint = ("10.0.0.1", 30000 + len(name))
        self.queue = queue  # what Serve's queue-length probe answers; None: it does not answer

    async def get_queue_len(self, *, deadline_s):
        import asyncio

        if self.queue is None:
            await asyncio.sleep(10)
        return self.queue


class _Pending:
    def __init__(self, *args):
        self.args = list(args)


def _request_router(**values):
    router = object.__new__(routing.AffinityRequestRouter)  # Serve's constructor needs a running Serve
    router.initialize_state(**RoutingArgs.model_validate({"mode": "prefix", **values}).model_dump())
    return router


class TestRequestRouter:
    def test_should_choose_by_the_route_key_and_count_what_it_sent(self):
        import asyncio

        router = _request_router(max_imbalance=1)
        # Replicas that do not answer the probe: the reports and the sends are all there is.
        replicas = [_Replica("a", routing.routing_stats(0, 10, [])), _Replica("b", routing.routing_stats(0, 10, []))]
        key = routing.route_key(chat("A", "q1"))
        first = asyncio.run(router.choose_replicas(replicas, _Pending(key)))[0][0]
        again = asyncio.run(router.choose_replicas(replicas, _Pending(routing.route_key(chat("A", "q2")))))[0][0]
        assert again is first
        # Two sent, no new count: the guard (1) now sends the tenant's next request elsewhere.
        third = asyncio.run(router.choose_replicas(replicas, _Pending(routing.route_key(chat("A", "q3")))))[0][0]
        assert third is not first
        assert router.decisions == {"prefix-new": 1, "prefix": 1, "guard": 1}

    def test_should_take_the_probed_counts_as_the_load(self):
        import asyncio

        router = _request_router(max_imbalance=1)
        idle = [_Replica("a", queue=0), _Replica("b", queue=0)]
        first = asyncio.run(router.choose_replicas(idle, _Pending(routing.route_key(chat("A", "q1")))))[0][0]
        busy = {first.replica_id.name: 3}
        probed = [_Replica(name, queue=busy.get(name, 0)) for name in ("a", "b")]
        moved = asyncio.run(router.choose_replicas(probed, _Pending(routing.route_key(chat("A", "q2")))))[0][0]
        assert moved.replica_id.name != first.replica_id.name

    def test_should_read_the_adapters_each_replica_reports(self):
        import asyncio

        router = _request_router()
        replicas = [_Replica("a", routing.routing_stats(3, 1, []), queue=3),
                    _Replica("b", routing.routing_stats(3, 1, ["sql"]), queue=3)]
        chosen = asyncio.run(router.choose_replicas(replicas, _Pending(RouteKey(text="x", adapter="sql"))))[0][0]
        assert chosen.replica_id.name == "b"

    def test_should_route_a_handle_call_without_a_key_by_load(self):
        import asyncio

        router = _request_router()
        replicas = [_Replica("a", queue=2), _Replica("b", queue=0)]
        assert asyncio.run(router.choose_replicas(replicas, None))[0][0].replica_id.name == "b"


class _Selection:
    def __init__(self, replica):
        self._replica = replica


class _Handle:
    def __init__(self, replica):
        self.replica, self.keys = replica, []

    def choose_replica(self, key, _reserve=True):
        import contextlib

        assert _reserve is False  # HAProxy sends the request; nothing is reserved on the replica
        self.keys.append(key)

        @contextlib.asynccontextmanager
        async def chosen():
            yield _Selection(self.replica)

        return chosen()


def _call(app, method, path, body=b"", headers=()):
    import asyncio

    sent, chunks = [], [{"type": "http.request", "body": body[:10], "more_body": True},
                        {"type": "http.request", "body": body[10:], "more_body": False}]

    async def receive():
        return chunks.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path, "headers": list(headers)}, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


class TestRouterApp:
    def test_should_answer_haproxy_with_the_replica_id_from_the_body_and_session(self):
        handle = _Handle(_Replica("a"))
        app = routing.RouterApp(handle, RoutingArgs(mode="session"), base_model="base")
        status, answer = _call(app, "POST", "/internal/route", chat("A", "hi", model="lora-1"),
                               [(b"x-session-id", b"s-7"), (b"content-type", b"application/json")])
        assert status == 200
        assert answer == {"replica_id": "SERVE_REPLICA::app#VLLMServer#a", "host": "10.0.0.1", "port": 30001}
        assert handle.keys[0].session == "s-7" and handle.keys[0].adapter == "lora-1"
        assert "Rule A-0" in handle.keys[0].text

    def test_should_say_503_with_the_reason_when_no_replica_can_be_chosen(self):
        class Broken(_Handle):
            def choose_replica(self, key, _reserve=True):
                raise RuntimeError("no replicas")

        status, answer = _call(routing.RouterApp(Broken(None), RoutingArgs(mode="prefix"), "base"),
                               "POST", "/internal/route", b"{}")
        assert status == 503 and "no replicas" in answer["detail"]

    def test_should_serve_health_and_refuse_other_paths(self):
        app = routing.RouterApp(_Handle(_Replica("a")), RoutingArgs(mode="prefix"), "base")
        assert _call(app, "GET", "/health")[0] == 200
        assert _call(app, "GET", "/v1/models")[0] == 404


class TestBuild:
    def _build(self, mode):
        import vllm_app

        return vllm_app.build_app({"model": {"id": "some/model"}, "serving": {"routing": {"mode": mode}}})

    def test_leastconn_should_build_the_app_as_before_without_a_router(self):
        app = self._build("leastconn")
        assert app._ingress_request_router is None
        config = app._bound_deployment._deployment_config.request_router_config
        assert config.is_default_request_router()

    @pytest.mark.parametrize("mode", ["session", "prefix"])
    def test_a_routed_mode_should_attach_the_router_and_the_request_router_class(self, mode):
        app = self._build(mode)
        router = app._ingress_request_router._bound_deployment
        assert router.name == "VLLMRouter"
        assert router.ray_actor_options["num_cpus"] == 0
        config = app._bound_deployment._deployment_config.request_router_config
        assert config.request_router_class == "vllm_app_routing:AffinityRequestRouter"
        assert config.request_router_kwargs["mode"] == mode

    def test_should_fail_at_build_naming_the_ray_version_when_the_hook_is_gone(self, monkeypatch):
        from ray.serve import Application

        monkeypatch.delattr(Application, "_with_ingress_request_router")
        with pytest.raises(ValueError, match=r"vllm_app cannot start: serving.routing needs .* Ray 2.60.0.*leastconn"):
            self._build("prefix")

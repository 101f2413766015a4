"""serving.routing live: the chart's app with 2 model replicas and its router on the local Ray,
behind HAProxy, on the real vLLM CPU engine (tiny model). It is deployed beside the session's apps
(tests/app/conftest.py) under its own route, first in prefix mode, then switched in place to
session mode. Which replica served a request is read from the replicas' own log lines (each
names the request id the test sent).

What a user would notice: a tenant's turns land on one replica; a flood of one shared prompt
spreads over both once the load guard trips; a session's turns land on one replica, by header or
by the OpenAI `user` field; killing a router replica under load loses no request."""

import asyncio
import glob
import os
import time
import uuid
from collections import Counter

import httpx
import pytest

from tools import serve_local, tiny_lora

from tests.app.conftest import API_KEY

APP, PREFIX = "routed", "/routed"
SERVED = "tiny-routed"
ADAPTER = "tiny-routed-lora"
# Tenants are placed on replicas by a hash of their prompt and the (random) replica ids: with
# 8 tenants over 2 replicas, all land on one replica once in 128 deployments (a CI run failed
# so). With 20, once in about 500,000.
TENANTS = "ABCDEFGHIJKLMNOPQRST"
# One tenant's long shared system prompt: about 2,000 characters, well over prefixMinMatchChars.
SYSTEM = {tenant: f"You are the assistant of tenant {tenant}. "
          + "".join(f"Rule {tenant}{n}: answer briefly and politely. " for n in range(50)) for tenant in TENANTS}


def routing_app(server, tiny_model_dir, mode: str, adapters_folder=None) -> dict:
    values = {"model": {"servedName": SERVED}, "engine": {"maxModelLen": 2048},
              "serving": {"replicas": 2, "engineStallSeconds": 120,
                          "routing": {"mode": mode, "maxImbalance": 3}}}
    if adapters_folder is not None:
        # No adapter listed in values (each replica would register it at start): loaded on first
        # use, on the replica that first serves it, so the replicas' adapters differ.
        values["lora"] = {"enabled": True, "maxLoras": 2, "maxLoraRank": 8, "loadOnFirstUse": True,
                          "volume": {"enabled": True, "mountPath": str(adapters_folder)}}
    config, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model=str(tiny_model_dir),
                                               port=server.port, values=values)
    [app] = config["applications"]
    app.update(name=APP, route_prefix=PREFIX)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0
    app["deployments"][0]["graceful_shutdown_timeout_s"] = 5
    return app


def deploy(server, app) -> None:
    others = [a for a in server.config["applications"] if a["name"] != APP]
    server.config = {**server.config, "applications": [*others, app]}
    started = time.monotonic()
    server.submit()
    # A mode change restarts the app in place: wait until the model deployment runs the new mode.
    mode = app["args"]["serving"]["routing"]["mode"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = server.status().get("applications", {}).get(APP, {})
        model = status.get("deployments", {}).get("VLLMServer", {})
        kwargs = model.get("deployment_config", {}).get("request_router_config", {}).get("request_router_kwargs", {})
        if status.get("status") == "RUNNING" and model.get("status") == "HEALTHY" and kwargs.get("mode") == mode:
            break
        if status.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            pytest.fail(f"{APP} is {status.get('status')}: {status.get('message')}")
        time.sleep(1)
    else:
        pytest.fail(f"{APP} did not run with its new args in 600 s: {server.status()}")
    wait_for_a_router_in_the_path(server)
    print(f"\n{APP} ({app['args']['serving']['routing']['mode']}) RUNNING after {time.monotonic() - started:.1f}s")


def running_routers(server) -> list[dict]:
    """The router deployment's RUNNING replicas, as Serve's status lists them."""
    router = server.status()["applications"][APP]["deployments"].get("VLLMRouter", {})
    return [replica for replica in router.get("replicas", []) if replica.get("state") == "RUNNING"]


def routers_logged(server, replica_ids, request_id) -> bool:
    """Whether one of the given router replicas logged the request (Serve's access line for the
    router's call names the client's x-request-id, which HAProxy passes on)."""
    for replica_id in replica_ids:
        path = os.path.join(server.logs_dir, "serve", f"replica_{APP}_VLLMRouter_{replica_id}.log")
        if os.path.exists(path):
            with open(path, errors="replace") as log:
                if any(f" {request_id} " in line for line in log):
                    return True
    return False


def wait_for_a_router_in_the_path(server, timeout: float = 120) -> None:
    """The app runs before HAProxy reloads its config with the new routers; until then HAProxy
    balances by leastconn, and a tenant's first turns land on either replica (a CI run failed
    so). Send probes until one of the current router replicas logs one."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as http:
        while time.monotonic() < deadline:
            current = [replica["replica_id"] for replica in running_routers(server)]
            request_id = f"probe-{uuid.uuid4().hex[:12]}"
            response = http.post(f"{PREFIX}/tokenize", json={"model": SERVED, "prompt": "router probe"},
                                 headers={"x-request-id": request_id})
            assert response.status_code == 200, response.text
            for _ in range(6):  # Serve writes its access line within a moment
                time.sleep(0.5)
                if routers_logged(server, current, request_id):
                    return
    pytest.fail(f"no router replica of {APP} logged a probe in {timeout:.0f} s: HAProxy does not ask it. "
                f"Router deployment: {server.status()['applications'][APP]['deployments'].get('VLLMRouter')}")


@pytest.fixture(scope="module")
def routed(server, tiny_model_dir):
    """Deploys the routed app in a mode: routed(mode). Removed after this module."""
    original = server.config

    def in_mode(mode, adapters_folder=None):
        deploy(server, routing_app(server, tiny_model_dir, mode, adapters_folder))

    try:
        yield in_mode
    finally:
        # Removing the routed app restarts nothing else, but wait until Serve says so: a module
        # run after this one must not find an app still DEPLOYING.
        server.config = original
        server.submit()
        server.wait_running()


def served_by(server, request_ids, timeout: float = 30) -> dict:
    """{request id: replica log file} for the routed app's replicas."""
    pattern = os.path.join(server.logs_dir, "serve", f"replica_{APP}_VLLMServer_*.log")
    deadline, found = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and len(found) < len(request_ids):
        time.sleep(0.5)
        for path in glob.glob(pattern):
            with open(path, errors="replace") as log:
                for line in log:
                    for request_id in request_ids:
                        if f"request_id={request_id} " in line:
                            found[request_id] = os.path.basename(path)
    missing = [r for r in request_ids if r not in found]
    assert not missing, f"no replica logged {missing[:3]}... ({len(missing)} of {len(request_ids)})"
    return found


def chat_body(tenant, turns, **extra):
    messages = [{"role": "system", "content": SYSTEM[tenant]}]
    for n, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if n < len(turns) - 1:
            messages.append({"role": "assistant", "content": f"Answer {n}."})
    return {"model": SERVED, "messages": messages, "max_tokens": 8, "temperature": 0, **extra}


def post(client, body, headers=None) -> str:
    request_id = f"rt-{uuid.uuid4().hex[:12]}"
    response = client.post(f"{PREFIX}/v1/chat/completions", json=body,
                           headers={"x-request-id": request_id, **(headers or {})})
    assert response.status_code == 200, response.text
    return request_id


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as http:
        yield http


async def flood(server, bodies, headers=None) -> list:
    async with httpx.AsyncClient(base_url=server.url, timeout=180,
                                 headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})}) as http:
        async def one(body):
            request_id = f"rt-{uuid.uuid4().hex[:12]}"
            response = await http.post(f"{PREFIX}/v1/chat/completions", json=body, headers={"x-request-id": request_id})
            return request_id, response.status_code, response.text[:200]
        return await asyncio.gather(*map(one, bodies))


# -- prefix mode -------------------------------------------------------------------------------


def test_prefix_mode_should_keep_each_tenants_turns_on_one_replica(server, routed, client):
    routed("prefix")
    turns = {tenant: [post(client, chat_body(tenant, [f"question {n}" for n in range(1, turn + 1)]))
                      for turn in range(1, 5)] for tenant in TENANTS}
    where = served_by(server, [r for ids in turns.values() for r in ids])
    homes = {tenant: {where[r] for r in ids} for tenant, ids in turns.items()}
    print("replica of each tenant:", homes)
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    # Twenty tenants placed by hash over two replicas: both get some.
    assert len(set().union(*homes.values())) == 2, homes


def test_prefix_mode_should_spread_a_flood_of_one_prompt_once_the_guard_trips(server, routed):
    bodies = [chat_body("A", [f"user {n} asks"], max_tokens=64) for n in range(16)]
    results = asyncio.run(flood(server, bodies))
    assert all(status == 200 for _, status, _ in results), results
    counts = Counter(served_by(server, [r for r, _, _ in results]).values())
    print("one shared prompt, 16 at once:", dict(counts))
    assert len(counts) == 2 and min(counts.values()) >= 4, counts


# -- session mode (switched in place) ----------------------------------------------------------


def test_session_mode_should_keep_a_sessions_turns_on_one_replica_by_header_or_user(server, routed, client):
    routed("session")
    # Ten sessions of each kind, placed by hash: both replicas get some (see TENANTS).
    by_header = {s: [post(client, chat_body(TENANTS[n], [f"turn {t} of {s}"]), {"x-session-id": s})
                     for t in range(3)] for n, s in enumerate(f"s-{i}" for i in range(10))}
    by_user = {u: [post(client, chat_body(TENANTS[n], [f"turn {t}"], user=u)) for t in range(3)]
               for n, u in enumerate(f"user-{i}" for i in range(10))}
    sessions = {**by_header, **by_user}
    where = served_by(server, [r for ids in sessions.values() for r in ids])
    homes = {session: {where[r] for r in ids} for session, ids in sessions.items()}
    print("replica of each session:", homes)
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    assert len(set().union(*homes.values())) == 2, homes


def test_killing_a_router_replica_under_load_should_lose_no_request(server, routed):
    import ray

    routers = [replica["actor_name"] for replica in running_routers(server)]
    assert len(routers) == 2, routers  # serving.routing.routerReplicasPerNode on this one node
    victim = ray.get_actor(routers[0], namespace="serve")

    async def load_with_a_kill():
        bodies = [chat_body("ABCDEFGH"[n % 8], [f"kill test {n}"], max_tokens=32) for n in range(60)]
        waves = []
        for start in range(0, 60, 10):
            if start == 20:
                ray.kill(victim, no_restart=False)
            waves += await flood(server, bodies[start:start + 10], {"x-session-id": f"k-{start}"})
        return waves

    results = asyncio.run(load_with_a_kill())
    failed = [(r, status, text) for r, status, text in results if status != 200]
    assert not failed, f"{len(failed)} of {len(results)} failed after a router replica was killed: {failed[:3]}"


# -- adapter affinity, and every router gone (prefix mode again, with LoRA) --------------------


@pytest.fixture(scope="module")
def adapters_folder(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("routing-adapters")
    tiny_lora.build(tiny_model_dir, folder / ADAPTER, rank=8, seed=1)
    return folder


def test_an_adapters_requests_should_stay_on_the_replica_that_loaded_it(server, routed, client, adapters_folder):
    routed("prefix", adapters_folder)
    # The base model first: each tenant's prompt is placed by hash, some on each replica.
    base = {tenant: post(client, chat_body(tenant, ["which replica?"])) for tenant in TENANTS}
    where = served_by(server, list(base.values()))
    base_home = {tenant: where[request_id] for tenant, request_id in base.items()}
    assert len(set(base_home.values())) == 2, base_home
    # The adapter's first request loads it on one replica; the routers learn that from its next
    # report (every STATS_PERIOD_S).
    first = post(client, {**chat_body("A", ["load the adapter"]), "model": ADAPTER})
    holder = served_by(server, [first])[first]
    time.sleep(3)
    # The tenants whose prompts live on the other replica: for the adapter, they go to its holder.
    elsewhere = [tenant for tenant, home in base_home.items() if home != holder]
    sent = [post(client, {**chat_body(tenant, ["which replica?"]), "model": ADAPTER}) for tenant in elsewhere]
    where = served_by(server, sent)
    print(f"adapter loaded on {holder}; base homes {base_home}; adapter requests went to {where}")
    assert set(where.values()) == {holder}, (holder, where)


def test_with_every_router_replica_dead_requests_should_fail_fast_then_recover(server, routed, client):
    """Ray 2.60's Lua routes through a router or fails: with no router left, HAProxy answers 503
    (X-Serve-Reason: router_unreachable), never a hang or a 500, until Serve has replaced the
    routers. The window is measured and printed (README, "Routing across replicas")."""
    import ray

    replicas = running_routers(server)
    assert len(replicas) == 2, replicas
    outcomes = []  # (seconds after the kill, status, X-Serve-Reason, seconds taken)
    for replica in replicas:
        ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"), no_restart=False)
    killed = time.monotonic()
    answered = 0
    while time.monotonic() - killed < 180 and answered < 5:
        sent = time.monotonic()
        response = client.post(f"{PREFIX}/v1/chat/completions", json=chat_body("B", ["after the kill"]))
        outcomes.append((round(sent - killed, 1), response.status_code,
                         response.headers.get("x-serve-reason", ""), round(time.monotonic() - sent, 2)))
        answered = answered + 1 if response.status_code == 200 else 0
        time.sleep(0.5)
    failed = [o for o in outcomes if o[1] != 200]
    print(f"every router killed: {len(failed)} of {len(outcomes)} failed, the last sent at "
          f"{failed[-1][0] if failed else 0} s; {outcomes[:3]} ... {outcomes[-3:]}")
    assert answered == 5, f"not answering 180 s after every router was killed: {outcomes[-10:]}"
    # No hang: HAProxy's Lua gives each router RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S
    # (5 s) before it tries the next; a router being replaced may take all of it (seen: 6.0 s).
    from ray.serve._private.constants import RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_TIMEOUT_S as router_timeout

    slowest = len(replicas) * router_timeout + 2
    assert all(status == 503 and reason and took < slowest for _, status, reason, took in failed), failed

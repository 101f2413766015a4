"""Routing across model replicas by session, prompt prefix and LoRA adapter, with a load guard.

The chart ships this file beside vllm_app.py; `serving.routing` in values chooses the mode
(README, "Routing across replicas"). With mode `leastconn` nothing here runs: HAProxy balances
on its own. With `session` or `prefix`, HAProxy asks a small router deployment which replica
should take each POST, through Ray Serve's *ingress request router* hook (Ray 2.60, HAProxy
ingress): HAProxy's Lua action posts the request body to the router's /internal/route, the
router answers with a replica id, and HAProxy sends the request straight to that replica.
Read top to bottom:

  1. the args contract (RoutingArgs)      4. the policy: guard, adapter, session, prefix
  2. what a request is routed on          5. Serve's side: the request router class, the
  3. the replicas as the policy sees them    router deployment, the hook on the app

Sections 1 to 4 are plain Python with no Ray in them, unit-tested on their own
(tests/app/test_routing_units.py). Section 5 is the only place that touches Ray Serve's
internals; it checks their shape when the app is built and fails with a message naming the
Ray version it was tested with.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

logger = logging.getLogger("ray.serve")

# ---------------------------------------------------------------------------------------------
# 1. The args contract: serveConfigV2 `args.serving.routing`, the chart's serving.routing.
# ---------------------------------------------------------------------------------------------


class RoutingArgs(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    mode: Literal["leastconn", "session", "prefix"] = "leastconn"
    # The header a client names its session with (session mode; the OpenAI `user` field counts
    # too). HAProxy's Lua forwards only Serve's session header, RAY_SERVE_SESSION_ID_HEADER_KEY,
    # which the chart sets from this value on every Ray pod.
    session_header: str = "x-session-id"
    # Prefix mode: a prompt is cut into blocks of this many characters; a replica matches a
    # prompt when it was sent the same leading blocks.
    prefix_block_chars: int = Field(default=128, ge=16)
    # Prefix mode: prompts sharing fewer leading characters than this are not kept together.
    prefix_min_match_chars: int = Field(default=512, ge=16)
    # Prefix index size, in blocks (about 100 bytes each), least recently used first out.
    prefix_max_blocks: int = Field(default=200_000, ge=1000)
    # The load guard: affinity never sends a request to a replica holding more than this many
    # requests above the least-loaded replica.
    max_imbalance: int = Field(default=4, ge=0)
    # Prefer replicas that already hold the requested LoRA adapter (both modes).
    adapter_affinity: bool = True

    @property
    def routed(self) -> bool:
        return self.mode != "leastconn"


# ---------------------------------------------------------------------------------------------
# 2. What a request is routed on, read from the OpenAI body HAProxy forwards.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteKey:
    """The parts of one request a policy may route on; any may be empty."""
    text: str = ""        # the prompt as text: messages in order, or the completion prompt
    session: str = ""     # the session header, else the OpenAI `user` field
    adapter: str = ""     # the requested `model`, when it is not the base model


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(part.get("text", "") for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def prompt_text(body: dict) -> str:
    """The prompt in the order the model reads it. Roles are kept, so that a system prompt and
    the same words as a user turn are different prefixes, as they are to the engine."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(f"\x1e{message.get('role', '')}\x1f{_content_text(message.get('content'))}"
                       for message in messages if isinstance(message, dict))
    for name in ("prompt", "input"):  # completions; responses
        value = body.get(name)
        if isinstance(value, list) and value:
            value = value[0]  # a batch of prompts: route on the first
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # token ids
            return ",".join(map(str, value))
    return ""


def route_key(body: bytes, session_header_value: str = "", base_model: str = "") -> RouteKey:
    """The RouteKey of a raw request body. A body that is not a JSON object routes on the
    session header alone (HAProxy may cut a very large body; a cut body is rarely valid JSON)."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        return RouteKey(session=session_header_value)
    user = data.get("user") if isinstance(data.get("user"), str) else ""
    model = data.get("model") if isinstance(data.get("model"), str) else ""
    return RouteKey(text=prompt_text(data), session=session_header_value or user,
                    adapter=model if model and model != base_model else "")


# ---------------------------------------------------------------------------------------------
# 3. The replicas, as the policy sees them.
# ---------------------------------------------------------------------------------------------


@dataclass
class ReplicaView:
    id: str
    load: float = 0.0                       # requests it holds, as best known (section 5)
    adapters: frozenset = frozenset()        # LoRA adapters it has loaded


def _hash(*parts: str) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return int.from_bytes(digest.digest(), "big")


def rendezvous(key: str, replicas: Sequence[ReplicaView]) -> ReplicaView:
    """The replica a key hashes to (highest random weight): the same on every router, and when a
    replica comes or goes only its own keys move."""
    return max(replicas, key=lambda replica: _hash(key, replica.id))


# ---------------------------------------------------------------------------------------------
# 4. The policy. A chain: the guard keeps the replicas no more than max_imbalance above the least
#    loaded; adapter affinity narrows them to those holding the adapter; then session or prefix
#    affinity picks one. Each step may only narrow, so an added policy cannot break the guard.
# ---------------------------------------------------------------------------------------------


@dataclass
class Decision:
    replica: str
    reason: str      # "session", "prefix", "prefix-new", "least-loaded", "guard": for logs and metrics
    matched_chars: int = 0


class PrefixIndex:
    """Which replicas were sent which prompt prefixes: chained hashes of fixed-size blocks of the
    prompt text (block i's hash covers blocks 0..i), each mapped to the replicas it went to,
    least recently used out first. What it estimates is the replica's prefix cache; a real
    cache may have evicted it, which only costs the hit."""

    def __init__(self, block_chars: int, max_blocks: int):
        self.block_chars, self.max_blocks = block_chars, max_blocks
        self._blocks: OrderedDict[int, set] = OrderedDict()

    def hashes(self, text: str) -> list[int]:
        hashes, previous = [], ""
        for end in range(self.block_chars, len(text) + 1, self.block_chars):
            previous = f"{_hash(previous, text[end - self.block_chars:end]):x}"
            hashes.append(int(previous, 16))
        return hashes

    def matches(self, hashes: list[int], replicas: set) -> dict[str, int]:
        """{replica id: matched leading characters} for the replicas given that match at all."""
        matched, alive = {}, set(replicas)
        for index, block in enumerate(hashes):
            holders = self._blocks.get(block)
            alive &= holders or set()
            if not alive:
                break
            for replica in alive:
                matched[replica] = (index + 1) * self.block_chars
        return matched

    def insert(self, hashes: list[int], replica: str) -> None:
        for block in hashes:
            holders = self._blocks.get(block)
            if holders is None:
                self._blocks[block] = {replica}
            else:
                holders.add(replica)
                self._blocks.move_to_end(block)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def forget(self, replica: str) -> None:
        for block in [block for block, holders in self._blocks.items() if replica in holders]:
            holders = self._blocks[block]
            holders.discard(replica)
            if not holders:
                del self._blocks[block]

    def __len__(self) -> int:
        return len(self._blocks)


class AffinityPolicy:
    """Chooses a replica for a RouteKey. Pure: no Ray, no clock but the one passed in."""

    def __init__(self, args: RoutingArgs):
        self.args = args
        self.prefixes = PrefixIndex(args.prefix_block_chars, args.prefix_max_blocks)
        self.sessions: OrderedDict[str, str] = OrderedDict()  # session -> replica, after a move
        self.max_sessions = 100_000

    # -- steps -----------------------------------------------------------------------------

    def within_guard(self, replicas: Sequence[ReplicaView]) -> list[ReplicaView]:
        floor = min(replica.load for replica in replicas)
        return [replica for replica in replicas if replica.load <= floor + self.args.max_imbalance]

    def holding_adapter(self, key: RouteKey, replicas: list[ReplicaView]) -> list[ReplicaView]:
        if not (self.args.adapter_affinity and key.adapter):
            return replicas
        return [replica for replica in replicas if key.adapter in replica.adapters] or replicas

    @staticmethod
    def least_loaded(key: RouteKey, replicas: list[ReplicaView]) -> ReplicaView:
        # Ties go by hash of the key, so that two routers given the same prompt agree.
        floor = min(replica.load for replica in replicas)
        return rendezvous(key.text[:256] or key.session, [r for r in replicas if r.load == floor])

    def by_session(self, key: RouteKey, allowed: list[ReplicaView], everyone: Sequence[ReplicaView]):
        ids = {replica.id for replica in allowed}
        home = self.sessions.get(key.session)
        if home is None or home not in {replica.id for replica in everyone}:
            home = rendezvous(key.session, everyone).id
        if home in ids:
            self.sessions.pop(key.session, None) if home == rendezvous(key.session, everyone).id else \
                self.sessions.move_to_end(key.session)
            return Decision(home, "session")
        # The session's replica is over the guard: move the session, and keep it where it went.
        moved = self.least_loaded(key, allowed).id
        self.sessions[key.session] = moved
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return Decision(moved, "guard")

    def by_prefix(self, key: RouteKey, allowed: list[ReplicaView], everyone: Sequence[ReplicaView]):
        hashes = self.prefixes.hashes(key.text)
        ids = {replica.id for replica in allowed}
        matched = self.prefixes.matches(hashes, {replica.id for replica in everyone})
        useful = {replica: chars for replica, chars in matched.items() if chars >= self.args.prefix_min_match_chars}
        if any(replica in ids for replica in useful):
            best = max(chars for replica, chars in useful.items() if replica in ids)
            choices = [replica for replica in allowed if useful.get(replica.id) == best]
            choice = min(choices, key=lambda replica: replica.load)
            decision = Decision(choice.id, "prefix", best)
        elif useful:
            # Every replica holding the prefix is over the guard: spread it to one more replica.
            decision = Decision(self.least_loaded(key, allowed).id, "guard")
        elif len(key.text) >= self.args.prefix_min_match_chars:
            # A prefix no replica holds yet: place it by hash of its first min-match characters,
            # so that routers that have not seen it agree, and so that prompts which share only
            # that much stay together.
            decision = Decision(rendezvous(key.text[:self.args.prefix_min_match_chars], allowed).id, "prefix-new")
        else:
            decision = Decision(self.least_loaded(key, allowed).id, "least-loaded")
        self.prefixes.insert(hashes, decision.replica)
        return decision

    # -- the chain -------------------------------------------------------------------------

    def choose(self, key: RouteKey, replicas: Sequence[ReplicaView]) -> Decision:
        if not replicas:
            raise ValueError("no replicas to choose from")
        allowed = self.holding_adapter(key, self.within_guard(replicas))
        if self.args.mode == "session" and key.session:
            return self.by_session(key, allowed, replicas)
        if self.args.mode == "prefix" and key.text:
            return self.by_prefix(key, allowed, replicas)
        return Decision(self.least_loaded(key, allowed).id, "least-loaded")

    def forget(self, replica: str) -> None:
        """A replica left: drop what the index says it holds."""
        self.prefixes.forget(replica)
        for session in [s for s, home in self.sessions.items() if home == replica]:
            del self.sessions[session]


class LoadEstimate:
    """The requests each replica holds, as best this router knows: the last count it observed
    (a probe of the replica a moment ago, or the replica's periodic report), plus the requests
    this router sent it that the count cannot include yet. A send is counted until `transit_s`
    after the observation that followed it: by then the replica counts it itself, or it is done.

    Why not the sends alone: HAProxy, not the router, carries the request, so the router never
    sees one end. Why not the counts alone: a burst is routed faster than a replica counts it."""

    def __init__(self, transit_s: float = 0.03):
        self.transit_s = transit_s
        self._observed: dict[str, tuple[float, float]] = {}  # replica -> (when, requests held)
        self._sends: dict[str, list[float]] = {}

    def observe(self, replica: str, in_flight: float, at: float) -> None:
        if at >= self._observed.get(replica, (float("-inf"), 0))[0]:
            self._observed[replica] = (at, in_flight)
            self._sends[replica] = [t for t in self._sends.get(replica, []) if t > at - self.transit_s]

    def sent(self, replica: str, at: float) -> None:
        self._sends.setdefault(replica, []).append(at)

    def load(self, replica: str) -> float:
        return self._observed.get(replica, (0, 0.0))[1] + len(self._sends.get(replica, ()))

    def keep_only(self, replicas: set) -> list[str]:
        gone = [replica for replica in {*self._observed, *self._sends} if replica not in replicas]
        for replica in gone:
            self._observed.pop(replica, None)
            self._sends.pop(replica, None)
        return gone


# ---------------------------------------------------------------------------------------------
# 5. Ray Serve's side. The router deployment asks the model deployment's handle to choose a
#    replica without sending anything (choose_replica with _reserve=False, as Ray Serve LLM's
#    LLMRouter does); the handle runs AffinityRequestRouter, the model deployment's request
#    router class, which applies the policy above. HAProxy then sends the request itself.
# ---------------------------------------------------------------------------------------------

# The Ray this hook is tested with. Application._with_ingress_request_router is marked internal.
RAY_VERSION_TESTED = "2.60.0"
ROUTER_DEPLOYMENT = "VLLMRouter"
# How often each model replica reports its load and adapters to the routers (record_routing_stats).
STATS_PERIOD_S = 0.5
# Each routing decision asks the replicas how many requests they hold, when there are at most
# this many of them, and waits at most this long for the answers.
PROBE_MAX_REPLICAS = 16
PROBE_TIMEOUT_S = 0.05


def routing_stats(in_flight: int, served: int, adapters: Sequence[str]) -> dict:
    """What a model replica reports to the routers (its record_routing_stats). Serve's controller
    sends the replicas' stats to every handle when they change, so they hold nothing that changes
    while the replica is idle (no clock): an idle cluster sends no updates."""
    return {"in_flight": in_flight, "served": served, "adapters": sorted(adapters)}


def check_ray_hooks() -> None:
    """Fail at build time, naming the Ray versions, when the hooks this module uses changed."""
    import ray
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

    missing = [name for name, present in [
        ("Application._with_ingress_request_router",
         hasattr(Application, "_with_ingress_request_router")),
        ("DeploymentHandle.choose_replica", hasattr(DeploymentHandle, "choose_replica")),
    ] if not present]
    try:
        from ray.serve.request_router import RequestRouter  # noqa: F401
    except ImportError:
        missing.append("ray.serve.request_router.RequestRouter")
    if missing:
        raise RuntimeError(
            f"serving.routing needs Ray Serve's ingress request router hook as in Ray {RAY_VERSION_TESTED}, "
            f"but Ray {ray.__version__} lacks {', '.join(missing)}. Use an image with Ray {RAY_VERSION_TESTED}, "
            "or serving.routing.mode=leastconn (README, \"Routing across replicas\").")
    if ray.__version__ != RAY_VERSION_TESTED:
        logger.warning("Ray %s is installed; serving.routing is tested with Ray %s.", ray.__version__,
                       RAY_VERSION_TESTED)


try:
    from ray.serve.request_router import RequestRouter
except ImportError:  # a Ray without the public request-router API: check_ray_hooks says so
    RequestRouter = object


class AffinityRequestRouter(RequestRouter):
    """The model deployment's request router: section 4's policy over Serve's replicas. It runs
    inside each router replica (through that replica's handle), so each keeps its own index.

    Serve pickles this class by value; its methods import this module at run time (the replicas
    have files/ on their path), so that the policy's classes travel by reference."""

    def initialize_state(self, **routing):
        import vllm_app_routing as this

        self.policy = this.AffinityPolicy(this.RoutingArgs.model_validate(routing))
        self.loads = this.LoadEstimate()
        self.reports: dict = {}  # replica -> the last report seen
        self.decisions: dict = {}

    async def _probe(self, replicas) -> None:
        """Ask every replica how many requests it holds (Serve's own queue-length call, about a
        millisecond each); a replica that does not answer in PROBE_TIMEOUT_S keeps its estimate."""
        import asyncio
        import time

        import vllm_app_routing as this

        if len(replicas) > this.PROBE_MAX_REPLICAS:
            return  # then the periodic reports alone (README, "Routing across replicas")
        asked = time.monotonic()
        tasks = {asyncio.ensure_future(replica.get_queue_len(deadline_s=this.PROBE_TIMEOUT_S)): replica
                 for replica in replicas}
        done, pending = await asyncio.wait(tasks, timeout=this.PROBE_TIMEOUT_S)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is None:
                self.loads.observe(tasks[task].replica_id.to_full_id_str(), task.result(), asked)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        import time

        import vllm_app_routing as this

        now = time.monotonic()
        for replica in candidate_replicas:
            replica_id, stats = replica.replica_id.to_full_id_str(), replica.routing_stats or {}
            report = (stats.get("served"), stats.get("in_flight"))
            if "served" in stats and self.reports.get(replica_id) != report:
                # A new report: taken up to a stats period ago.
                self.reports[replica_id] = report
                self.loads.observe(replica_id, stats["in_flight"], now - this.STATS_PERIOD_S)
        await self._probe(candidate_replicas)
        views = [this.ReplicaView(replica.replica_id.to_full_id_str(),
                                  self.loads.load(replica.replica_id.to_full_id_str()),
                                  frozenset((replica.routing_stats or {}).get("adapters", ())))
                 for replica in candidate_replicas]
        for gone in self.loads.keep_only({view.id for view in views}):
            self.policy.forget(gone)
            self.reports.pop(gone, None)
        args = pending_request.args if pending_request is not None else []
        key = args[0] if args and isinstance(args[0], this.RouteKey) else this.RouteKey()
        decision = self.policy.choose(key, views)
        self.loads.sent(decision.replica, time.monotonic())
        self.decisions[decision.reason] = self.decisions.get(decision.reason, 0) + 1
        return [[next(r for r in candidate_replicas if r.replica_id.to_full_id_str() == decision.replica)]]


# Serve imports the request router class by this path.
REQUEST_ROUTER_CLASS = "vllm_app_routing:AffinityRequestRouter"


def request_router_config(args: RoutingArgs) -> dict:
    """The model deployment's request_router_config for a routed mode."""
    return {"request_router_class": REQUEST_ROUTER_CLASS,
            "request_router_kwargs": args.model_dump(),
            "request_routing_stats_period_s": STATS_PERIOD_S,
            "request_routing_stats_timeout_s": 5.0}


class RouterApp:
    """The router deployment's HTTP app: POST /internal/route (HAProxy's Lua) and GET /health."""

    def __init__(self, handle, args: RoutingArgs, base_model: str):
        self.handle, self.args, self.base_model = handle, args, base_model
        self.session_header = args.session_header.lower().encode()
        self.routed = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"].endswith("/health"):
            return await _json(send, 200, {"status": "ok", "routed": self.routed})
        if scope["method"] != "POST" or not scope["path"].endswith("/internal/route"):
            return await _json(send, 404, {"detail": "not found"})
        body = bytearray()
        while True:
            message = await receive()
            body.extend(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        session = headers.get(self.session_header) or headers.get(self.session_header.replace(b"-", b"_"), b"")
        key = route_key(bytes(body), session.decode("latin-1"), self.base_model)
        try:
            async with self.handle.choose_replica(key, _reserve=False) as selection:
                replica = selection._replica
                replica_id = replica.replica_id.to_full_id_str()
                host, port = replica.backend_http_endpoint or (None, None)
        except Exception as error:  # HAProxy answers 503 on a non-200; say why in the log
            logger.warning("routing failed: %s", error)
            return await _json(send, 503, {"detail": str(error)})
        self.routed += 1
        await _json(send, 200, {"replica_id": replica_id, "host": host, "port": port})


async def _json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def router_deployment(handle_app, args: RoutingArgs, base_model: str):
    """The router deployment bound to the model deployment's app (its handle at run time)."""
    from ray import serve

    # Serve places RAY_SERVE_INGRESS_ROUTER_REPLICAS_PER_NODE replicas of it on every node that runs
    # HAProxy (the chart sets it from serving.routing.routerReplicasPerNode), and each HAProxy asks
    # the routers on its own node; a num_replicas here would be ignored.
    @serve.deployment(name=ROUTER_DEPLOYMENT, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    @serve.ingress()
    class VLLMRouter:
        def __init__(self, server, routing: dict, base_model: str):
            self.router = RouterApp(server, RoutingArgs.model_validate(routing), base_model)

        def __serve_build_asgi_app__(self):
            return self.router

        def get_stats(self) -> dict:
            return {"routed": self.router.routed}

    return VLLMRouter.bind(handle_app, args.model_dump(), base_model)


def routed_app(model_deployment, bind_args: tuple, args: RoutingArgs, base_model: str):
    """The model deployment bound as the app, with the router attached in a routed mode."""
    if not args.routed:
        return model_deployment.bind(*bind_args)
    check_ray_hooks()
    app = model_deployment.options(request_router_config=request_router_config(args)).bind(*bind_args)
    # The router's handle is the app itself: Serve hands the router a handle to the model deployment.
    return app._with_ingress_request_router(router_deployment(app, args, base_model))

"""Quotas and fair share per API key: requests and tokens per minute, concurrency caps and
priorities, enforced across all the replicas of the app (docs/quotas.md).

vllm_app's gate calls this module; nothing here touches vLLM. Read top to bottom:

  1. policies: the values contract (serving.keyPolicies, serving.defaultKeyPolicy), read live from
     the file the chart renders into the app ConfigMap
  2. the ledger: what every key spent over the last minute, service-wide, and who holds which
     concurrency slot. Pure arithmetic; a named detached Ray actor holds one for the whole app
  3. the replica's side: budget leased from the ledger in small slices, so that admitting a request
     never waits on a remote call; the charges, the headers and the 429s
  4. metrics

The rule, in one sentence: no 60-second span admits more than a key's requestsPerMinute requests,
or more than its tokensPerMinute tokens (prompt + completion), except that a request admitted
while budget was left always runs to its end, and what it used beyond the budget is charged to the
next window (the key waits until those tokens are a minute old).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Annotated, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError
from pydantic.alias_generators import to_camel

logger = logging.getLogger("ray.serve")

WINDOW_S = 60.0  # "per minute": a sliding window, not a calendar minute
REQUESTS, TOKENS, CONCURRENCY = "requests", "tokens", "concurrency"


# ---------------------------------------------------------------------------------------------
# 1. Policies. The bounds are the chart schema's (values.schema.json, "keyPolicy"); a number past
#    them is a typo, not a quota, and is refused at render time and again here at re-read.
# ---------------------------------------------------------------------------------------------

MAX_REQUESTS_PER_MINUTE = 10**8
MAX_TOKENS_PER_MINUTE = 10**11
MAX_CONCURRENT = 10**6
MAX_PRIORITY = 10**6

_Int = Annotated[int, Strict()]  # true is not 1, "5" is not 5


class KeyPolicy(BaseModel):
    """One key's policy. An unset field is unlimited (priority: vLLM's default, 0)."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    requests_per_minute: Optional[_Int] = Field(default=None, ge=1, le=MAX_REQUESTS_PER_MINUTE)
    tokens_per_minute: Optional[_Int] = Field(default=None, ge=1, le=MAX_TOKENS_PER_MINUTE)
    max_concurrent: Optional[_Int] = Field(default=None, ge=1, le=MAX_CONCURRENT)
    # vLLM's convention: lower is scheduled earlier; 0 is every other request's.
    priority: Optional[_Int] = Field(default=None, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    def limit(self, kind: str) -> Optional[int]:
        return self.requests_per_minute if kind == REQUESTS else self.tokens_per_minute


class PolicyFile(BaseModel):
    """What the chart renders into the app ConfigMap (key_policies.yaml)."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    default_key_policy: KeyPolicy = Field(default_factory=KeyPolicy)
    key_policies: dict[str, KeyPolicy] = Field(default_factory=dict)

    @property
    def any_priority(self) -> bool:
        return any(policy.priority is not None for policy in [self.default_key_policy, *self.key_policies.values()])


def parse_policies(text: str) -> PolicyFile:
    """The policy file's text as policies, or ValueError naming what is wrong."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"not YAML: {' '.join(str(error).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"expected a map with keyPolicies and defaultKeyPolicy, got {type(data).__name__}")
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as error:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())) from None


class Policies:
    """The policy file, re-read at most every `reload_s` seconds: the kubelet rewrites the ConfigMap
    mount within a minute or two of a `helm upgrade`, so a quota changes without a restart. A file
    that cannot be read or is not valid keeps the policies in force, and says why in the log once."""

    def __init__(self, path: Optional[str], reload_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path) if path else None
        self.reload_s, self.clock = reload_s, clock
        self.current = PolicyFile()
        self.problem: Optional[str] = None
        self._text: Optional[str] = None
        self._read_at = float("-inf")
        self.reload(force=True)

    def for_key(self, name: str) -> KeyPolicy:
        self.reload()
        return self.current.key_policies.get(name, self.current.default_key_policy)

    def reload(self, force: bool = False) -> None:
        if self.path is None or (not force and self.clock() - self._read_at < self.reload_s):
            return
        self._read_at = self.clock()
        try:
            text = self.path.read_text()
        except OSError as error:
            self._refuse(f"cannot read it ({error.strerror or error})", None)
            return
        if text == self._text:
            return
        try:
            policies = parse_policies(text)
        except ValueError as error:
            self._refuse(str(error), text)
            return
        self._text, self.current, self.problem = text, policies, None
        logger.info("key policies from %s: %d named, default %s", self.path, len(policies.key_policies),
                    policies.default_key_policy.model_dump(by_alias=True, exclude_none=True) or "unlimited")

    def _refuse(self, why: str, text: Optional[str]) -> None:
        self._text = text  # say it once per content, not at every re-read
        problem = f"the key policies in {self.path} are not applied: {why}; the previous policies stay in force"
        if problem != self.problem:
            logger.error("%s", problem)
        self.problem = problem


# ---------------------------------------------------------------------------------------------
# 2. The ledger. Times in its answers are durations, never clock readings: it may run on another
#    node, whose monotonic clock means nothing to the replica.
# ---------------------------------------------------------------------------------------------


class Ledger:
    """What each key spent over the last WINDOW_S seconds, service-wide, as (time, amount) entries,
    and the concurrency slots each replica holds.

    Replicas lease budget from it in slices (`sync`): a grant counts as spent at once, and what a
    replica gives back unspent comes off the key's most recent grants. Spending beyond a lease (a
    stream's tokens past the budget) is charged as reported, limit or not: it stays in the window
    for a minute, and the key's next grants wait for it to age out.
    """

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.clock = window_s, clock
        self.incarnation = uuid.uuid4().hex  # a restarted ledger is a new one, empty
        self._spent: dict[tuple[str, str], collections.deque] = {}
        self._slots: dict[str, dict[str, int]] = {}  # key -> replica -> slots held
        self._seen: dict[str, float] = {}  # replica -> its last call

    def used(self, key: str, kind: str) -> float:
        return sum(amount for _, amount in self._entries(key, kind, self.clock()))

    def _entries(self, key: str, kind: str, now: float) -> collections.deque:
        entries = self._spent.setdefault((key, kind), collections.deque())
        while entries and entries[0][0] <= now - self.window_s:
            entries.popleft()
        return entries

    def sync(self, replica: str, asks: list[dict], known: Optional[str] = None,
             history: Optional[list] = None, slots: Optional[dict] = None) -> dict:
        """Each ask: {key, kind, limit, want, charge, give_back}. Charges first (they happened),
        then give-backs, then the grant: at most `want`, and no more than the window has left.

        `known` is the incarnation the replica last synced with. A replica that knows another
        one (this ledger restarted, empty) must send `history` first: its own spending of the last
        minute as (key, kind, age in seconds, amount), and `slots`, its requests in flight by key
        under a concurrency cap. A replica back from an outage sends what it spent during the
        outage the same way. The asks' charges are then in the history already.

        Answers, per ask: granted, used (after the grant), free (what the limit leaves), free_in (seconds until the window has
        room for one more unit), empty_in (seconds until it holds nothing); and how many replicas
        called in the last half minute: the share each replica takes if the ledger goes away."""
        now = self.clock()
        self._seen[replica] = now
        if known != self.incarnation and (known is not None or history is None):
            # A new replica (known None) sends its whole last minute, perhaps nothing; one that
            # knew another ledger must: its history since an outage is not enough here.
            return {"incarnation": self.incarnation, "need_history": True}
        if history is not None:
            self._seed(replica, history, slots or {}, now)
        answers = []
        for ask in asks:
            entries = self._entries(ask["key"], ask["kind"], now)
            if ask.get("charge", 0) > 0 and history is None:
                entries.append([now, ask["charge"]])
            self._give_back(entries, ask.get("give_back", 0))
            used = sum(amount for _, amount in entries)
            granted = max(0, min(ask.get("want", 0), ask["limit"] - used))
            if granted > 0:
                entries.append([now, granted])
                used += granted
            answers.append({"granted": granted, "used": used, "free": max(0, ask["limit"] - used), "free_in": self._free_in(entries, ask["limit"], now),
                            "empty_in": max(0.0, entries[-1][0] + self.window_s - now) if entries else 0.0})
        self._forget_silent(now)
        return {"incarnation": self.incarnation, "answers": answers, "replicas": self.replicas(now)}

    @staticmethod
    def _give_back(entries: collections.deque, amount: float) -> None:
        while amount > 0 and entries:
            take = min(amount, entries[-1][1])
            entries[-1][1] -= take
            amount -= take
            if entries[-1][1] <= 0:
                entries.pop()

    def _free_in(self, entries, limit: float, now: float) -> float:
        """Seconds until the window has room for one more request or token."""
        used = sum(amount for _, amount in entries)
        for at, amount in entries:
            if used <= limit - 1:
                break
            used -= amount
            if used <= limit - 1:
                return max(0.0, at + self.window_s - now)
        return 0.0

    def _seed(self, replica: str, history: list, slots: dict, now: float) -> None:
        added = set()
        for key, kind, age, amount in history:
            if 0 <= age < self.window_s and amount > 0:
                self._entries(key, kind, now).append([now - age, amount])
                added.add((key, kind))
        for key_kind in added:  # back in time order
            self._spent[key_kind] = collections.deque(sorted(self._spent[key_kind]))
        for key, count in slots.items():
            self._slots.setdefault(key, {})[replica] = max(0, count)

    def acquire_slot(self, replica: str, key: str, cap: int) -> bool:
        """One of the key's `cap` concurrency slots for a request on `replica`, if one is free."""
        self._seen[replica] = self.clock()
        holders = self._slots.setdefault(key, {})
        if sum(holders.values()) >= cap:
            return False
        holders[replica] = holders.get(replica, 0) + 1
        return True

    def release_slot(self, replica: str, key: str) -> None:
        holders = self._slots.get(key, {})
        if holders.get(replica, 0) > 0:
            holders[replica] -= 1

    def slots_held(self, key: str) -> int:
        return sum(self._slots.get(key, {}).values())

    def replicas(self, now: Optional[float] = None) -> int:
        now = self.clock() if now is None else now
        return max(1, sum(1 for seen in self._seen.values() if now - seen < 30))

    def _forget_silent(self, now: float, after_s: float = 30) -> None:
        """A replica silent for `after_s` is gone (replicas call every second): its slots go back."""
        for replica in [name for name, seen in self._seen.items() if now - seen > after_s]:
            del self._seen[replica]
            for holders in self._slots.values():
                holders.pop(replica, None)

    def idle_s(self) -> float:
        return self.clock() - max(self._seen.values(), default=self.clock())


class LedgerActor:
    """The app's ledger as a Ray actor: one per app and version of this file, detached (it outlives
    the replica that created it), restarted empty by Ray if its process dies (the replicas then
    re-seed it), and gone by itself once no replica has called for IDLE_EXIT_S (the app was
    deleted). Its methods are async but never await, so each runs whole, one at a time."""

    IDLE_EXIT_S = 600

    def __init__(self):
        self.ledger = Ledger()
        self._watch: Optional[asyncio.Task] = None

    def _watching(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        while self.ledger.idle_s() < self.IDLE_EXIT_S:
            await asyncio.sleep(60)
        import ray

        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def sync(self, replica, asks, known=None, history=None, slots=None):
        self._watching()
        return self.ledger.sync(replica, asks, known, history, slots)

    async def acquire_slot(self, replica, key, cap):
        return self.ledger.acquire_slot(replica, key, cap)

    async def release_slot(self, replica, key):
        self.ledger.release_slot(replica, key)

    async def slots_held(self, key):
        return self.ledger.slots_held(key)


LEDGER_NAMESPACE = "vllm-rayservice"


def ledger_name(app_name: str) -> str:
    """The ledger actor's name: per app, and per version of this file, so that an app restarted on
    new code never talks to a ledger running the old."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return f"quota-ledger:{app_name}:{digest}"


def ray_ledger(app_name: str):
    """The app's ledger actor, created by the first replica that asks for it."""
    import ray

    return ray.remote(LedgerActor).options(
        name=ledger_name(app_name), namespace=LEDGER_NAMESPACE, get_if_exists=True, lifetime="detached",
        max_restarts=-1, num_cpus=0).remote()


class RemoteLedger:
    """The ledger actor, seen from a replica: calls with a deadline."""

    def __init__(self, handle, timeout_s: float = 2.0):
        self.handle, self.timeout_s = handle, timeout_s

    async def sync(self, *args):
        return await asyncio.wait_for(self.handle.sync.remote(*args), self.timeout_s)

    async def acquire_slot(self, *args):
        return await asyncio.wait_for(self.handle.acquire_slot.remote(*args), self.timeout_s)

    def release_slot(self, *args):
        self.handle.release_slot.remote(*args)  # nobody waits; after an outage the replica re-seeds its slots


class LocalLedger:
    """A ledger in the replica's own process, with the same calls, enforcing `share` of every limit:
    the fallback while the app's ledger is unreachable (share 1/replicas), and the whole ledger
    when there is no Ray to hold one (share 1, in the unit tests)."""

    def __init__(self, share: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.ledger, self.share = Ledger(clock=clock), share

    def _shared(self, limit: float) -> int:
        return max(1, math.floor(limit * self.share))

    async def sync(self, replica, asks, known=None, history=None, slots=None):
        asks = [{**ask, "limit": self._shared(ask["limit"])} for ask in asks]
        return self.ledger.sync(replica, asks, self.ledger.incarnation if known is None else known, history, slots)

    async def acquire_slot(self, replica, key, cap):
        return self.ledger.acquire_slot(replica, key, self._shared(cap))

    def release_slot(self, replica, key):
        self.ledger.release_slot(replica, key)


# ---------------------------------------------------------------------------------------------
# 3. The replica's side.
# ---------------------------------------------------------------------------------------------

SLICE_S = 1.0  # a lease is about one second of a key's budget
SYNC_S = 1.0  # every replica calls the ledger at least this often (its heartbeat)
IDLE_GIVE_BACK_S = 2.0  # a lease unused this long goes back to the ledger
RECONNECT_S = 5.0  # how often a replica tries an unreachable ledger again
MAX_SYNCS_PER_S = 50


class Account:
    """One key's budget of one kind (requests or tokens) at this replica.

    credit: leased and not yet spent. owed: spent beyond the lease, charged at the next sync.
    room: how far this replica may spend beyond its lease before the next sync (at most one slice,
    and no more than the ledger had left), so that a replica whose lease has just run out does not
    refuse what the ledger would grant. Across N replicas that can admit up to N slices more than
    the limit in a window, which the next grants then wait for.
    """

    def __init__(self, key: str, kind: str, limit: int):
        self.key, self.kind = key, kind
        self.set_limit(limit)
        self.credit = 0.0
        self.owed = 0.0
        self.ledger_free = 0.0  # until the first sync says otherwise
        self.room = 0.0
        self.free_at = 0.0
        self.empty_at = 0.0
        self.last_demand = float("-inf")
        self.synced = False  # the ledger has answered about it at least once
        self.asking = False  # a request waits for the next sync's grant
        self.history: collections.deque = collections.deque()  # (time, amount) spent at this replica

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.slice = max(1, math.ceil(limit * SLICE_S / WINDOW_S))

    def can_spend(self) -> bool:
        return self.credit + max(self.room, 0.0) >= 1

    def spend(self, amount: float, now: float) -> None:
        if amount <= 0:
            return
        from_credit = min(self.credit, amount)
        self.credit -= from_credit
        self.owed += amount - from_credit
        self.room -= amount - from_credit
        self.last_demand = now
        self.history.append((now, amount))
        while self.history and self.history[0][0] <= now - WINDOW_S:
            self.history.popleft()

    def remaining(self) -> int:
        return max(0, math.floor(self.credit + max(self.ledger_free - self.owed, 0.0)))

    @property
    def small(self) -> bool:
        """A limit of at most one a second: its requests ask the ledger one by one (below)."""
        return self.slice == 1

    def needs_sync(self, now: float) -> bool:
        """Whether the next sync has something to do: charge a debt, or top up a lease that runs low
        while in demand. A small limit is never leased ahead: one replica would hold a good part of
        the minute idle while another refuses for want of it."""
        return self.owed > 0 or (not self.small and self.credit < self.slice / 2
                                 and now - self.last_demand < IDLE_GIVE_BACK_S)


class Admission:
    """The gate's answer for one request: admitted or refused, and the headers to send."""

    def __init__(self, headers: list, refused: Optional[str] = None, retry_after_s: float = 0.0,
                 message: str = "", priority: Optional[int] = None, done: Optional[Callable[[int], None]] = None):
        self.headers, self.refused, self.retry_after_s, self.message = headers, refused, retry_after_s, message
        self.priority = priority
        self._done = done

    def done(self, tokens: int) -> None:
        """The request ended (completed, failed, or cut off by its client): charge its tokens and
        give its concurrency slot back."""
        if self._done is not None:
            self._done(tokens)
            self._done = None

    def retry_headers(self) -> list:
        seconds = max(self.retry_after_s, 0.05)
        return [(b"retry-after", str(math.ceil(seconds)).encode()),
                (b"retry-after-ms", str(math.ceil(seconds * 1000)).encode())]


def reset_text(seconds: float) -> str:
    """A duration the way OpenAI writes x-ratelimit-reset-*: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{rest}s"


class Quotas:
    """Admission by key policy at one replica. Rate limits are decided from this replica's leases
    alone, but for a key's first request here and for small limits (see admit); a concurrency cap
    asks the ledger for a slot, since a cap that holds across replicas cannot be decided locally. A
    background task keeps the leases topped up, charges what was spent beyond them, and is the
    replica's heartbeat to the ledger."""

    def __init__(self, policies: Policies, replica: str, connect: Optional[Callable[[], object]] = None,
                 metrics=None, priority_scheduling: bool = False, clock: Callable[[], float] = time.monotonic,
                 background: bool = True):
        self.policies, self.replica, self.connect = policies, replica, connect
        self.background = background  # off in unit tests, which call sync_once themselves
        self.metrics, self.priority_scheduling, self.clock = metrics, priority_scheduling, clock
        self.accounts: dict[tuple[str, str], Account] = {}
        self.in_flight: collections.Counter = collections.Counter()  # by key, under a concurrency cap
        self.ledger = None
        self.ledger_ok = True  # the last call to the app's ledger worked (or none was made yet)
        self.incarnation: Optional[str] = None  # the ledger's, as of the last sync
        self.outage_since: Optional[float] = None
        self.replicas = 1
        self._next_connect = float("-inf")
        self._wake = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._sync_lock: Optional[asyncio.Lock] = None
        if policies.current.any_priority and not priority_scheduling:
            logger.warning("a key policy sets a priority, but the engine runs without priority scheduling: "
                           "the chart turns it on when serving.keyPolicies sets a priority (an app restart)")

    # -- admission: the hot path. No remote call but in the three cases the README lists. --------

    async def admit(self, key: str, charged: bool = True) -> Admission:
        """Whether a request with key `key` may go in. `charged`: it counts against the limits
        (every POST); the other requests only get the headers."""
        policy = self.policies.for_key(key)
        now = self.clock()
        accounts = [account for account in (self._account(key, kind, policy.limit(kind)) for kind in (REQUESTS, TOKENS))
                    if account is not None]
        priority = (policy.priority or 0) if self.priority_scheduling else None
        if not accounts and policy.max_concurrent is None:
            return Admission([], priority=priority)
        self._ensure_running()
        asking = [account for account in accounts if not account.synced or (charged and account.small
                                                                             and account.credit < 1)]
        if asking:
            # The ledger is asked, and the request waits for its answer: for a key's first request
            # at this replica (each replica would otherwise admit a slice of its own before learning
            # that the minute is spent), and for each request of a small limit (at most one a
            # second: the wait, about a millisecond, is nothing next to the limit).
            for account in asking:
                account.last_demand, account.asking = now, True
            await self.sync()
            now = self.clock()
        if not charged:
            return Admission(self._headers(accounts, now), priority=priority)
        for account in accounts:
            if not account.can_spend():
                account.last_demand = now  # the next sync tops the lease up
                self._wake.set()
                return self._refuse(key, account.kind, accounts, now, policy)
        if policy.max_concurrent is not None:
            if not await self._acquire_slot(key, policy.max_concurrent):
                return self._refuse(key, CONCURRENCY, accounts, now, policy)
            self.in_flight[key] += 1
        if (key, REQUESTS) in self.accounts:
            self.accounts[(key, REQUESTS)].spend(1, now)
        if (key, TOKENS) in self.accounts:
            self.accounts[(key, TOKENS)].last_demand = now
        headers = self._headers(accounts, now)
        if any(account.needs_sync(now) for account in accounts):
            self._wake.set()
        return Admission(headers, priority=priority,
                         done=functools.partial(self._done, key, policy.max_concurrent is not None))

    def _account(self, key: str, kind: str, limit: Optional[int]) -> Optional[Account]:
        account = self.accounts.get((key, kind))
        if limit is None:
            self.accounts.pop((key, kind), None)  # no limit (any more)
            return None
        if account is None:
            account = self.accounts[(key, kind)] = Account(key, kind, limit)
        elif account.limit != limit:
            account.set_limit(limit)
        return account

    def _done(self, key: str, holds_slot: bool, tokens: int) -> None:
        account = self.accounts.get((key, TOKENS))
        if account is not None and tokens > 0:
            account.spend(tokens, self.clock())
            self._wake.set()
        if holds_slot:
            self.in_flight[key] -= 1
            try:
                self.ledger.release_slot(self.replica, key)
            except Exception as error:  # noqa: BLE001 (a dead actor: re-seeded when it is back)
                self._lost(error)

    def _refuse(self, key: str, reason: str, accounts: list, now: float, policy: KeyPolicy) -> Admission:
        if reason == CONCURRENCY:
            retry = 1.0
            message = (f"Rate limit reached for key {key}: at most {policy.max_concurrent} requests in flight at "
                       "once. Retry when one of them has finished.")
        else:
            account = self.accounts[(key, reason)]
            # With room left in the ledger, this replica's next lease is on its way: retry soon.
            retry = max(account.free_at - now, 0.1) if account.ledger_free - account.owed < 1 else 0.1
            unit = "requests" if reason == REQUESTS else "tokens (prompt + completion)"
            message = (f"Rate limit reached for key {key} on {unit} per minute: limit {account.limit}, "
                       f"remaining {account.remaining()}. Please try again in {reset_text(retry)}.")
        if self.metrics is not None:
            self.metrics.throttled(key, reason)
        return Admission(self._headers(accounts, now), refused=TOKENS if reason == TOKENS else REQUESTS,
                         retry_after_s=retry, message=message)

    def _headers(self, accounts: list, now: float) -> list:
        headers = []
        for account in accounts:
            remaining = account.remaining()
            reset = max(account.empty_at - now, 0.0) if remaining < account.limit else 0.0
            headers += [(f"x-ratelimit-limit-{account.kind}".encode(), str(account.limit).encode()),
                        (f"x-ratelimit-remaining-{account.kind}".encode(), str(remaining).encode()),
                        (f"x-ratelimit-reset-{account.kind}".encode(), reset_text(reset).encode())]
        return headers

    async def _acquire_slot(self, key: str, cap: int) -> bool:
        ledger = self._ledger()
        try:
            return await ledger.acquire_slot(self.replica, key, cap)
        except Exception as error:  # noqa: BLE001 (whatever the ledger's failure)
            self._lost(error)
            return await self.ledger.acquire_slot(self.replica, key, cap)

    # -- the ledger -----------------------------------------------------------------------------

    def _ledger(self):
        if self.ledger is None or (not self.ledger_ok and self.clock() >= self._next_connect):
            self._next_connect = self.clock() + RECONNECT_S
            if self.connect is None:
                self.ledger = LocalLedger(1.0, clock=self.clock)
            else:
                try:
                    self.ledger = RemoteLedger(self.connect())
                except Exception as error:  # noqa: BLE001
                    self._lost(error)
        return self.ledger

    def _lost(self, error: BaseException) -> None:
        """The app's ledger failed a call: go on with the leases held, then with a ledger of this
        replica's own for its share of the limits, seeded with what it spent in the last minute."""
        now = self.clock()
        if self.ledger_ok:
            logger.error("the quota ledger is unreachable (%s): this replica goes on under its last leases, then "
                         "enforces its share (1/%d) of every key's limits by itself, and tries the ledger again "
                         "every %.0f s", _one_line(error), self.replicas, RECONNECT_S)
            self.ledger_ok = False
            self.outage_since = now
        local = LocalLedger(1.0 / self.replicas, clock=self.clock)
        local.ledger.sync(self.replica, [], None, self._history(now), dict(self.in_flight))
        self.ledger = local
        self._next_connect = now + RECONNECT_S
        if self.metrics is not None:
            self.metrics.ledger_up(False)

    def _ensure_running(self) -> None:
        if self.background and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), SYNC_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.sync()
                # At most MAX_SYNCS_PER_S calls, and room for the event loop even when the ledger
                # answers at once (the in-process fallback does).
                await asyncio.sleep(1 / MAX_SYNCS_PER_S)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (the loop must go on; the error is logged)
                logger.exception("quota sync failed")

    async def sync(self) -> None:
        """sync_once, one call at a time."""
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            ledger = self.ledger
            await self.sync_once()
            if self.ledger is not ledger and isinstance(self.ledger, LocalLedger):
                await self.sync_once()  # the ledger just went away: ask this replica's own at once

    async def sync_once(self) -> None:
        """One call to the ledger: charge what was spent beyond the leases, top up the leases in
        demand, give back idle ones, and learn what is left of every limit."""
        ledger = self._ledger()
        remote = isinstance(ledger, RemoteLedger)
        now = self.clock()
        history = slots = None
        if remote and (self.incarnation is None or self.outage_since is not None):
            since = self.outage_since if self.incarnation is not None else None
            history, slots = self._history(now, since), dict(self.in_flight)
        accounts = list(self.accounts.values())
        asks, taken = [], []
        asking = [account.asking for account in accounts]
        for account in accounts:
            give_back = account.credit if now - account.last_demand > IDLE_GIVE_BACK_S else 0.0
            want = account.slice if (account.needs_sync(now) or account.asking) and not give_back else 0
            account.asking = False
            asks.append({"key": account.key, "kind": account.kind, "limit": account.limit, "want": want,
                         "charge": account.owed, "give_back": give_back})
            taken.append((account.owed, give_back))
            account.owed -= account.owed
            account.credit -= give_back
        try:
            answer = await ledger.sync(self.replica, asks, self.incarnation if remote else None, history, slots)
            if answer.get("need_history"):
                raise _Restarted(answer["incarnation"])
        except BaseException as error:
            for account, (charge, give_back), asked in zip(accounts, taken, asking):
                account.owed += charge
                account.credit += give_back
                account.asking = asked
            if isinstance(error, _Restarted):
                logger.warning("the quota ledger restarted empty; this replica gives it its spending of the last minute")
                self.incarnation = None
                self._wake.set()
                return
            if isinstance(error, Exception) and not isinstance(error, asyncio.CancelledError):
                self._lost(error)
                return
            raise
        if remote:
            if not self.ledger_ok:
                logger.warning("the quota ledger is reachable again; this replica's spending while it was not is "
                               "in it now")
            self.ledger_ok, self.outage_since = True, None
            self.incarnation, self.replicas = answer["incarnation"], answer["replicas"]
            if self.metrics is not None:
                self.metrics.ledger_up(True)
        now = self.clock()
        for account, result in zip(accounts, answer["answers"]):
            account.credit += result["granted"]
            account.ledger_free = result["free"]  # this replica's lease is in the ledger's `used`
            account.room = 0.0 if account.small else min(account.ledger_free, account.slice)
            account.free_at = now + result["free_in"]
            account.empty_at = now + result["empty_in"]
            account.synced = True
            if self.metrics is not None:
                self.metrics.remaining(account.key, account.kind, account.remaining())
        if any(account.needs_sync(now) and account.ledger_free >= 1 for account in accounts):
            self._wake.set()

    def _history(self, now: float, since: Optional[float] = None) -> list:
        return [(account.key, account.kind, now - at, amount) for account in self.accounts.values()
                for at, amount in account.history if now - at < WINDOW_S and (since is None or at >= since)]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


class _Restarted(Exception):
    pass


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


# ---------------------------------------------------------------------------------------------
# 4. Metrics, on Ray's metrics export like the app's per-key counters.
# ---------------------------------------------------------------------------------------------


class QuotaMetrics:
    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        self._throttled = Counter("vllm_rayservice_throttled_requests",
                                  "Requests refused with 429 by API key name and the limit they hit "
                                  "(requests, tokens, concurrency).", tag_keys=("key", "reason"))
        self._remaining = Gauge("vllm_rayservice_quota_remaining",
                                "What is left of a key's requests or tokens per minute, as a replica last "
                                "heard from the quota ledger.", tag_keys=("key", "resource"))
        self._ledger_up = Gauge("vllm_rayservice_quota_ledger_up",
                                "1 while the replica reaches the app's quota ledger, 0 while it enforces its "
                                "share of the limits by itself.")

    def throttled(self, key: str, reason: str) -> None:
        self._throttled.inc(1, {"key": key, "reason": reason})

    def remaining(self, key: str, resource: str, value: float) -> None:
        self._remaining.set(value, {"key": key, "resource": resource})

    def ledger_up(self, up: bool) -> None:
        self._ledger_up.set(1 if up else 0)


def start(policies_file: Optional[str], app_name: str, priority_scheduling: bool) -> Optional[Quotas]:
    """The replica's quotas, or None when the chart gave no policy file (quotas off)."""
    if not policies_file:
        return None
    replica = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    return Quotas(Policies(policies_file), replica, connect=lambda: ray_ledger(app_name), metrics=QuotaMetrics(),
                  priority_scheduling=priority_scheduling)

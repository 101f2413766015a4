"""Scenario 5: hostile input. Property-based fuzzing of every route, then hand-made attacks. The
promise: no 5xx, no crash, no hang; the replica that took it all is the one still serving.

Fuzzed requests stay cheap so a few thousand fit in a minute: they fail validation, or they
generate at most 2 tokens. Hypothesis runs derandomized (a fixed seed), so a run is repeatable.
"""

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults import load
from tests.faults.conftest import API_KEY, MAX_MODEL_LEN, SERVED_NAME

pytestmark = pytest.mark.faults

REQUEST_TIMEOUT_S = 15.0  # a fuzzed request that takes longer counts as hung
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large])

# -- strategies ---------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# Token counts either tiny (so a valid request is cheap) or plainly invalid.
small_or_bad_int = st.sampled_from([1, 2]) | st.integers(-3, 0) | st.sampled_from(
    [2**31, 2**63, -2**63, 10**30, "2", 1.5, None, True])
names = st.just(SERVED_NAME) | st.text(max_size=12) | json_values
texts = st.text(max_size=40) | json_values
roles = st.sampled_from(["user", "system", "assistant", "tool", "developer", "function"]) | st.text(max_size=8)
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}, optional={
    "name": texts, "tool_calls": json_values, "tool_call_id": texts}), max_size=3) | json_values


def _with(required: dict, optional: dict):
    """A request body: maybe-valid required fields, any of the optional ones, maybe a stray key."""
    return st.fixed_dictionaries(required, optional={**optional, "stray_field": json_values})


sampling = {"temperature": st.floats(-1, 3) | json_values, "top_p": st.floats(-1, 2) | json_values,
            "top_k": st.integers(-2, 50) | json_values, "seed": st.integers(-2**63, 2**63) | json_values,
            "n": st.integers(-1, 3) | st.sampled_from([2**31, 10**20]) | json_values,
            "stop": texts | st.lists(st.text(max_size=5), max_size=5), "stream": st.booleans() | json_values,
            "logprobs": st.booleans() | small_or_bad_int, "min_tokens": small_or_bad_int,
            "presence_penalty": st.floats(-3, 3) | json_values, "logit_bias": json_values,
            "response_format": json_values | st.fixed_dictionaries({"type": st.sampled_from(
                ["json_object", "json_schema", "text", "bogus"])}, optional={"json_schema": json_values}),
            "stream_options": json_values, "ignore_eos": st.booleans()}
ROUTES = {
    "/v1/chat/completions": _with({"model": names, "messages": messages, "max_tokens": small_or_bad_int},
                                  {**sampling, "top_logprobs": small_or_bad_int, "tools": json_values,
                                   "tool_choice": json_values, "max_completion_tokens": small_or_bad_int}),
    "/v1/completions": _with({"model": names, "prompt": texts | st.lists(st.integers(-5, 3000), max_size=8),
                              "max_tokens": small_or_bad_int}, {**sampling, "echo": st.booleans() | json_values,
                                                                "suffix": texts, "best_of": small_or_bad_int}),
    "/v1/responses": _with({"model": names, "input": texts | messages, "max_output_tokens": small_or_bad_int},
                           {"instructions": texts, "temperature": sampling["temperature"],
                            "stream": sampling["stream"], "tools": json_values, "store": json_values}),
    "/v1/messages": _with({"model": names, "messages": messages, "max_tokens": small_or_bad_int},
                          {"system": texts, "stream": sampling["stream"], "stop_sequences": json_values}),
    "/v1/messages/count_tokens": _with({"model": names, "messages": messages}, {"system": texts}),
    "/tokenize": _with({"model": names}, {"prompt": texts, "messages": messages,
                                          "add_special_tokens": json_values}),
    "/detokenize": _with({"model": names, "tokens": st.lists(st.integers(-2**40, 2**40), max_size=8) | json_values},
                         {}),
}
GET_ROUTES = ["/health", "/v1/models", "/version", "/v1/responses/{}", "/metrics", "/docs", "/{}"]


# 4xx answers whose body is not OpenAI's (status: example), reported in the figures. vLLM's own
# server answers the same way: FastAPI's {"detail": ...} for a body it cannot parse as JSON, and
# for a route vLLM does not mount for this model (e.g. /pooling on a generative model).
NOT_OPENAI_4XX: dict = {}


def _check(response: httpx.Response, what) -> None:
    assert response.status_code < 500, f"{what} -> {response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        body = response.json()  # always JSON, whoever answered
        if not load.is_openai_error(body):
            NOT_OPENAI_4XX.setdefault(str(response.status_code), response.text[:120])


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module", autouse=True)
def replica_at_start(stack):
    """The replica serving when this module starts; it must be the one serving at its end."""
    stack.wait_healthy(1)
    [pid] = stack.running_pids()
    return pid


@pytest.fixture(scope="module")
def fuzzed():
    """How many cases each fuzz test sent, for the figures."""
    return {}


# -- fuzzing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzzed_bodies_should_never_get_a_5xx(healthy, http, fuzzed, route):
    sent = []

    @settings(max_examples=400, **FUZZ)
    @given(body=ROUTES[route])
    def fuzz(body):
        sent.append(1)
        _check(http.post(route, json=body), body)

    fuzz()
    fuzzed[route] = len(sent)


@settings(max_examples=400, **FUZZ)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
       path=st.sampled_from(sorted(ROUTES) + GET_ROUTES),
       segment=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e, exclude_characters="/?#%"), min_size=1,
                       max_size=12),
       body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
def test_fuzzed_methods_paths_and_raw_bodies_should_never_get_a_5xx(healthy, http, fuzzed, method, path, segment,
                                                                    body, content_type):
    fuzzed["raw"] = fuzzed.get("raw", 0) + 1
    url = path.format(segment)
    headers = {"Content-Type": content_type} if content_type else {}
    _check(http.request(method, url, content=body, headers=headers), (method, url, body[:100]))


# -- hand-made cases ----------------------------------------------------------------------------


def _chat(**fields):
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


def _timed(http, method, path, **kwargs):
    started = time.monotonic()
    response = http.request(method, path, **kwargs)
    return response, time.monotonic() - started


HAND_MADE = {
    # name: (request kwargs, statuses allowed)
    "10 MB body": (dict(json=_chat(messages=[{"role": "user", "content": "hello " * (10 * 2**20 // 6)}])), {400, 413}),
    "JSON nested 100,000 deep": (dict(content=b'{"model": "tiny-llama", "messages": ' + b"[" * 100_000
                                      + b"]" * 100_000 + b"}", headers={"Content-Type": "application/json"}),
                                 {400, 413, 422}),
    "invalid UTF-8": (dict(content=b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
                           headers={"Content-Type": "application/json"}), {400}),
    "n of 10^9": (dict(json=_chat(n=10**9)), {400}),
    "max_tokens 2^31": (dict(json=_chat(max_tokens=2**31)), {400}),
    "a stop list of 1,000 strings": (dict(json=_chat(stop=[f"stop-{i}" for i in range(1000)])), {200, 400}),
}


@pytest.mark.parametrize("case", list(HAND_MADE))
def test_hand_made_attacks_should_get_a_clean_4xx_fast(healthy, http, figures, case):
    kwargs, allowed = HAND_MADE[case]
    response, seconds = _timed(http, "POST", "/v1/chat/completions", **kwargs)
    figures.setdefault("hostile_hand_made", {})[case] = {"status": response.status_code, "seconds": round(seconds, 2)}
    assert response.status_code in allowed, response.text[:300]
    if response.status_code != 200:
        body = response.json()
        # A body that is not JSON at all gets FastAPI's {"detail": ...} from vLLM's app, as from
        # vLLM's own server; everything else gets OpenAI's error.
        assert load.is_openai_error(body) or body == {"detail": "There was an error parsing the body"}, body
    assert http.get("/health").status_code == 200


def test_a_prompt_at_the_context_limit_should_pass_and_one_token_over_should_get_400(healthy, http):
    # Token ids, so the length is exact: prompt + max_tokens == max_model_len fits, one more does not.
    at_limit = {"model": SERVED_NAME, "prompt": [100] * (MAX_MODEL_LEN - 1), "max_tokens": 1}
    response = http.post("/v1/completions", json=at_limit)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["usage"]["prompt_tokens"] == MAX_MODEL_LEN - 1
    over = http.post("/v1/completions", json={**at_limit, "prompt": [100] * MAX_MODEL_LEN})
    assert over.status_code == 400 and load.is_openai_error(over.json()), over.text[:300]


async def _slow_loris(stack, body: bytes, slow_bytes: int, finish: bool):
    """Send headers, then `slow_bytes` of the body one byte a second; then the rest, or hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.serve.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
    for index in range(slow_bytes):
        writer.write(body[index:index + 1])
        await writer.drain()
        await asyncio.sleep(1)
    if not finish:
        writer.close()
        return None
    writer.write(body[slow_bytes:])
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=load.HUNG_S)
    writer.close()
    return int(answer.split(b" ", 2)[1])


def test_slow_loris_clients_should_not_hold_up_anyone_else(healthy, figures):
    stack = healthy
    body = json.dumps(_chat()).encode()

    async def scenario():
        lorises = [asyncio.create_task(_slow_loris(stack, body, 10, finish=i % 2 == 0)) for i in range(8)]
        await asyncio.sleep(2)
        async with load.client(stack.url, API_KEY) as client:
            others = []
            while not all(task.done() for task in lorises):
                others.append(await load.send(client, load.chat(SERVED_NAME, len(others), 8, stream=len(others) % 2 == 0)))
        return await asyncio.gather(*lorises), others

    statuses, others = asyncio.run(scenario())
    figures.setdefault("hostile_hand_made", {})["slow loris (8 clients, 1 byte/s for 10 s)"] = {
        "finished_statuses": [s for s in statuses if s is not None],
        "others_served_meanwhile": len(others), "others_slowest_s": round(max(o.seconds for o in others), 2)}
    assert [s for s in statuses if s is not None] == [200] * 4
    assert others and {o.kind for o in others} == {"completed"}
    assert max(o.seconds for o in others) < 5.0, "a slow client held up the others"


def test_after_all_that_the_same_replica_should_be_healthy_and_idle(healthy, fuzzed, figures, replica_at_start):
    """Runs last in this module: nothing above crashed or replaced the replica."""
    stack = healthy
    stats = stack.stats()
    assert stats["in_flight"] == 0 and stats["engine_unfinished"] == 0, stats
    assert stack.running_pids() == {stats["pid"]} == {replica_at_start}
    assert sum(fuzzed.values()) >= 3000, fuzzed
    figures["hostile_fuzz"] = {"sent": sum(fuzzed.values()), "by_route": dict(fuzzed), "5xx": 0,
                               "replica_restarts": 0, "4xx_without_openai_body": dict(NOT_OPENAI_4XX)}

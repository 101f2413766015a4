"""The app side by side with vLLM's own OpenAI server: the same tiny model, the same engine and
frontend arguments (derived from the chart's args by the app's own mapping), the same requests.

For every request: the statuses match; non-streamed bodies match entirely once ids and timestamps
are set aside (so greedy and seeded outputs match token for token, and errors match message for
message); streamed answers carry the same text, finish reasons and usage in chunks of the same shape
(how many chunks a stream is cut into depends on timing, so it is not compared).
"""

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import httpx
import jsonschema
import pytest

from bench import servers
from tests.app.conftest import API_KEY, MAX_MODEL_LEN, SERVED_NAME
from tools import serve_local

pytestmark = pytest.mark.engine

M = SERVED_NAME
HELLO = [{"role": "user", "content": "Hello, how are you?"}]
GREEDY = {"temperature": 0}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                                        "unit": {"type": "string", "enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]}},
                 "required": ["answer"], "additionalProperties": False}


@dataclass
class Case:
    id: str
    path: str
    body: object = None  # a dict is sent as JSON, bytes as they are
    method: str = "POST"
    stream: bool = False
    check: Optional[str] = None  # an extra check on this app's answer (see _extra_checks)
    extra: dict = field(default_factory=dict)

    def param(self):
        return pytest.param(self, id=self.id)


def chat(**fields):
    return {"model": M, "messages": HELLO, "max_tokens": 12, **fields}


def completion(**fields):
    return {"model": M, "prompt": "The river flows", "max_tokens": 12, **fields}


CASES = [
    # Chat completions: greedy, seeded sampling, n, stop, logprobs, limits, streaming.
    Case("chat-greedy", "/v1/chat/completions", chat(**GREEDY)),
    Case("chat-seeded-sampling", "/v1/chat/completions", chat(temperature=1.0, top_p=0.9, seed=1234)),
    Case("chat-n-seeded", "/v1/chat/completions", chat(n=3, temperature=1.0, seed=7)),
    Case("chat-stop", "/v1/chat/completions", chat(stop=["e", "a"], **GREEDY)),
    Case("chat-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=3, max_tokens=5, **GREEDY)),
    Case("chat-max-completion-tokens", "/v1/chat/completions",
         chat(max_completion_tokens=3, ignore_eos=True, **GREEDY)),
    Case("chat-system-and-text-parts", "/v1/chat/completions", chat(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}], **GREEDY)),
    # vLLM hands roles it does not know to the chat template rather than refusing them.
    Case("chat-custom-role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}], **GREEDY)),
    Case("chat-stream-usage", "/v1/chat/completions",
         chat(stream=True, stream_options={"include_usage": True}, **GREEDY), stream=True),
    Case("chat-stream-n-seeded", "/v1/chat/completions",
         chat(stream=True, n=2, temperature=1.0, seed=99, stream_options={"include_usage": True}), stream=True),
    # Tools: a named function, `required`, and `auto` (the test deployment configures a parser).
    Case("tools-named", "/v1/chat/completions", chat(
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0, seed=11, max_tokens=60), check="tool-arguments"),
    Case("tools-required", "/v1/chat/completions", chat(
        tools=[WEATHER], tool_choice="required", temperature=1.0, seed=11, max_tokens=400), check="tool-arguments"),
    Case("tools-auto", "/v1/chat/completions", chat(tools=[WEATHER], tool_choice="auto", **GREEDY)),
    Case("tools-named-stream", "/v1/chat/completions", chat(
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0, seed=11, max_tokens=60, stream=True), stream=True),
    # Structured output: response_format both kinds, and vLLM's own structured_outputs extras.
    Case("json-schema", "/v1/chat/completions", chat(
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}},
        temperature=1.0, seed=5, max_tokens=40), check="json-schema"),
    Case("json-object", "/v1/chat/completions", chat(
        response_format={"type": "json_object"}, temperature=1.0, seed=5, max_tokens=24)),
    Case("structured-choice", "/v1/chat/completions", chat(
        structured_outputs={"choice": ["red", "green", "blue"]}, **GREEDY), check="choice"),
    Case("structured-regex", "/v1/chat/completions", chat(
        structured_outputs={"regex": "[a-z]{4}-[0-9]{2}"}, **GREEDY), check="regex"),
    # Completions: greedy, a prompt list, echo with logprobs, streaming.
    Case("completion-greedy", "/v1/completions", completion(**GREEDY)),
    Case("completion-prompt-list", "/v1/completions", completion(prompt=["one", "two three"], **GREEDY)),
    Case("completion-echo-logprobs", "/v1/completions", completion(echo=True, logprobs=2, max_tokens=4, **GREEDY)),
    Case("completion-seeded-n", "/v1/completions", completion(n=2, temperature=0.8, seed=3)),
    Case("completion-stream", "/v1/completions",
         completion(stream=True, stream_options={"include_usage": True}, **GREEDY), stream=True),
    # Tokenizer routes, the model list, the Responses API.
    Case("tokenize-prompt", "/tokenize", {"model": M, "prompt": "Hello world"}),
    Case("tokenize-messages", "/tokenize", {"model": M, "messages": HELLO}),
    Case("detokenize", "/detokenize", {"model": M, "tokens": [77, 338, 462]}),
    Case("models", "/v1/models", method="GET"),
    Case("responses", "/v1/responses", {"model": M, "input": "Hello", "max_output_tokens": 10, "temperature": 0}),
    # Bad requests: rejected the way vLLM's server rejects them.
    Case("bad-unknown-model", "/v1/chat/completions", chat(model="gpt-4o")),
    Case("bad-missing-messages", "/v1/chat/completions", {"model": M}),
    Case("bad-messages-not-a-list", "/v1/chat/completions", {"model": M, "messages": "hello"}),
    Case("bad-max-tokens-string", "/v1/chat/completions", chat(max_tokens="ten")),
    Case("bad-max-tokens-beyond-context", "/v1/chat/completions", chat(max_tokens=MAX_MODEL_LEN)),
    Case("bad-prompt-beyond-context", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": "word " * (MAX_MODEL_LEN + 10)}])),
    Case("bad-temperature", "/v1/chat/completions", chat(temperature=-1)),
    Case("bad-n-zero", "/v1/chat/completions", chat(n=0)),
    Case("bad-top-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=50)),
    Case("bad-json", "/v1/chat/completions", b"{not json"),
    Case("bad-named-tool-without-tools", "/v1/chat/completions",
         chat(tool_choice={"type": "function", "function": {"name": "get_weather"}})),
    Case("bad-stream-beyond-context", "/v1/chat/completions", chat(max_tokens=MAX_MODEL_LEN, stream=True)),
    Case("bad-completion-empty-prompt", "/v1/completions", completion(prompt="")),
    Case("bad-tokenize-without-prompt", "/tokenize", {"model": M}),
]

# Values that differ between any two runs of the same request.
VOLATILE_KEYS = {"id", "created", "created_at", "system_fingerprint", "completed_at", "call_id"}


def normalize(value):
    """Ids and timestamps set aside; floats (logprobs) rounded, as two engine processes may differ
    in the last bits."""
    if isinstance(value, dict):
        return {key: "<volatile>" if key in VOLATILE_KEYS else normalize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalize(item) for item in value]
    if isinstance(value, float):
        return round(value, 3)
    return value


def shape(value):
    """The structure of a value: keys and types, not contents."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted({json.dumps(shape(item), sort_keys=True) for item in value})
    return type(value).__name__


def stream_summary(events: list):
    """What a stream says, however it was cut into chunks: per choice, the text (or tool call
    arguments) and finish reason; the usage; the distinct chunk shapes; the closing [DONE]."""
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    texts, finishes, usage = {}, {}, None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            index = choice["index"]
            delta = choice.get("delta", choice)
            text = (delta.get("content") or delta.get("text") or "")
            for call in delta.get("tool_calls") or []:
                text += (call.get("function") or {}).get("arguments") or ""
            texts[index] = texts.get(index, "") + text
            if choice.get("finish_reason"):
                finishes[index] = choice["finish_reason"]
    shapes = sorted({json.dumps(shape(normalize(chunk)), sort_keys=True) for chunk in chunks})
    return {"texts": texts, "finishes": finishes, "usage": usage, "shapes": shapes}


def send(base: str, case: Case, headers: dict):
    url = base + case.path
    with httpx.Client(timeout=300, headers=headers) as http:
        if case.method == "GET":
            response = http.get(url)
        elif isinstance(case.body, bytes):
            response = http.post(url, content=case.body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(url, json=case.body)
    if case.stream and response.status_code == 200:
        events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        return response.status_code, stream_summary(events)
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def reference(server):
    """vLLM's own server with the app's arguments, for this module only (a second engine)."""
    env = {"HF_HUB_OFFLINE": "1",
           # Ray gives a 1-CPU replica one OpenMP thread; the same here keeps the arithmetic alike.
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with servers.vllm_server(server.config, serve_local.free_port(), env) as url:
        yield url


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_the_app_should_answer_as_vllms_own_server_does(server, reference, case):
    theirs_status, theirs = send(reference, case, {})
    ours_status, ours = send(server.url, case, {"Authorization": f"Bearer {API_KEY}"})
    assert ours_status == theirs_status, (ours, theirs)
    assert normalize(ours) == normalize(theirs)
    if case.id.startswith("bad-"):
        assert 400 <= ours_status < 500
        assert set(ours["error"]) >= {"message", "type", "code"} and ours["error"]["message"]
    else:
        assert ours_status == 200, ours
    _extra_checks(case, ours)


def _extra_checks(case: Case, answer) -> None:
    """For constrained output, this app's answer obeys the constraint (not only equals vLLM's)."""
    if case.check is None:
        return
    message = answer["choices"][0]["message"]
    if case.check == "tool-arguments":
        assert message.get("tool_calls"), json.dumps(answer)
        for call in message["tool_calls"]:
            assert call["function"]["name"] == "get_weather"
            jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    elif case.check == "json-schema":
        jsonschema.validate(json.loads(message["content"]), ANSWER_SCHEMA)
    elif case.check == "choice":
        assert message["content"] in ("red", "green", "blue")
    elif case.check == "regex":
        import re

        assert re.fullmatch("[a-z]{4}-[0-9]{2}", message["content"]), message["content"]


def test_the_cases_should_cover_what_the_issue_names():
    """The list keeps about thirty requests of every kind, a dozen of them bad."""
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 30
    assert sum(case.id.startswith("bad-") for case in CASES) >= 12
    paths = {case.path for case in CASES}
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/models",
            "/v1/responses"} <= paths

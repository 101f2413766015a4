"""Bad requests get OpenAI's error shape with a 4xx status, never a 5xx, and before any stream
starts; the API key guards every route but /health; vLLM's development and admin routes are not
there. (test_vllm_parity.py checks that each status and message is vLLM's own server's.)"""

import pytest

from tests.app.conftest import API_KEY, MAX_MODEL_LEN

pytestmark = pytest.mark.engine

HELLO = [{"role": "user", "content": "Hello"}]


def _assert_openai_error(response, status=None):
    if status is None:
        assert 400 <= response.status_code < 500, response.text
    else:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert {"message", "type", "code"} <= set(error)
    assert error["message"]
    return error


CHAT_ERRORS = [
    # (vLLM's server answers a request without `model` with its one model, so this app does too.)
    pytest.param(lambda m: {"model": "gpt-4o", "messages": HELLO}, id="unknown-model"),
    pytest.param(lambda m: {"model": m}, id="missing-messages"),
    pytest.param(lambda m: {"model": m, "messages": "hello"}, id="messages-not-a-list"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "max_tokens": "ten"}, id="max-tokens-string"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "max_tokens": 0}, id="max-tokens-zero"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "temperature": -1}, id="negative-temperature"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "top_p": 0}, id="top-p-zero"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "n": 0}, id="n-zero"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "max_tokens": MAX_MODEL_LEN}, id="max-tokens-beyond-context"),
    pytest.param(lambda m: {"model": m, "messages": [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 10)}]},
                 id="prompt-longer-than-context"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "response_format": {"type": "json_schema"}},
                 id="json-schema-without-schema"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "tool_choice": "required"}, id="required-tools-without-tools"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("make_body", CHAT_ERRORS)
def test_bad_chat_requests_should_get_a_4xx_before_any_stream(http, model_name, make_body, stream):
    body = make_body(model_name)
    if stream:
        body["stream"] = True if body.get("stream") is None else body["stream"]
    _assert_openai_error(http.post("/v1/chat/completions", json=body))


def test_context_errors_should_name_the_limit(http, model_name):
    error = _assert_openai_error(http.post("/v1/chat/completions", json={
        "model": model_name, "messages": HELLO, "max_tokens": MAX_MODEL_LEN}), 400)
    assert str(MAX_MODEL_LEN) in error["message"]


def test_unknown_model_should_be_named(http):
    error = _assert_openai_error(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}), 404)
    assert "gpt-4o" in error["message"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"just a string"', b"\xff\xfe{}"],
                         ids=["broken", "empty", "array", "string", "invalid-utf8"])
def test_malformed_bodies_should_get_a_4xx(http, body):
    response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    _assert_openai_error(response)


@pytest.mark.parametrize("body", [
    {"model": "MODEL"},
    {"model": "MODEL", "prompt": []},
    {"model": "MODEL", "prompt": "x", "max_tokens": -3},
    {"model": "MODEL", "prompt": "x", "logprobs": 100},
], ids=["missing-prompt", "empty-list", "negative-max-tokens", "too-many-logprobs"])
def test_bad_completion_requests_should_get_a_4xx(http, model_name, body):
    body = {key: model_name if value == "MODEL" else value for key, value in body.items()}
    _assert_openai_error(http.post("/v1/completions", json=body))


@pytest.mark.parametrize("path", ["/v1/engines", "/metrics", "/docs", "/openapi.json", "/load", "/ping",
                                  "/scale_elastic_ep", "/invocations", "/inference/v1/generate"])
def test_routes_outside_the_openai_surface_should_get_an_openai_shaped_404(http, path):
    # vLLM's development, admin and SageMaker routes are not reachable through the Service.
    _assert_openai_error(http.get(path), 404)
    _assert_openai_error(http.post(path, json={}), 404)


def test_wrong_method_should_get_405(http):
    _assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_request_id_should_be_echoed_or_generated_and_be_the_engines(http, model_name):
    response = http.post("/v1/chat/completions", json={"model": model_name, "messages": HELLO, "max_tokens": 1},
                         headers={"X-Request-Id": "trace-abc-123"})
    assert response.headers.get_list("x-request-id") == ["trace-abc-123"]
    assert "trace-abc-123" in response.json()["id"]  # vLLM named its engine request after it
    generated = http.post("/v1/chat/completions", json={"model": model_name, "messages": HELLO, "max_tokens": 1})
    assert len(generated.headers.get_list("x-request-id")) == 1


class TestAuth:
    @pytest.mark.parametrize("path, method", [
        ("/v1/models", "GET"), ("/v1/chat/completions", "POST"), ("/v1/completions", "POST"),
        ("/v1/responses", "POST"), ("/tokenize", "POST"), ("/detokenize", "POST"), ("/version", "GET"),
        ("/v1/messages", "POST")])
    @pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {API_KEY}", "Bearer"],
                             ids=["none", "wrong-key", "wrong-scheme", "empty"])
    def test_requests_without_the_right_key_should_get_401(self, server, path, method, header):
        import httpx

        headers = {"Authorization": header} if header else {}
        response = httpx.request(method, server.url + path, headers=headers, json={}, timeout=30)
        error = _assert_openai_error(response, 401)
        assert error["code"] == "invalid_api_key"
        assert API_KEY not in response.text

    def test_the_right_key_should_get_200(self, http, model_name):
        assert http.get("/v1/models").status_code == 200
        assert http.post("/tokenize", json={"model": model_name, "prompt": "hi"}).status_code == 200

    def test_health_should_stay_open(self, server):
        import httpx

        assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_a_model_without_a_chat_template_should_get_a_clear_400(server, model_name):
    import httpx

    from tests.app.conftest import NO_TEMPLATE_ROUTE

    base = server.url + NO_TEMPLATE_ROUTE
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": model_name, "messages": HELLO, "max_tokens": 4})
    error = _assert_openai_error(response, 400)
    assert "chat template" in error["message"]
    # Plain completions need no template and still work.
    completion = httpx.post(base + "/v1/completions", headers=headers, timeout=60,
                            json={"model": model_name, "prompt": "The river", "max_tokens": 4, "ignore_eos": True})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 4


def test_each_request_should_log_one_line_without_prompt_or_key(server, http, model_name):
    import glob
    import os
    import time
    import uuid

    request_id = f"log-check-{uuid.uuid4().hex[:8]}"
    marker = "PRIVATE-PROMPT-TEXT"
    response = http.post("/v1/chat/completions", headers={"X-Request-Id": request_id}, json={
        "model": model_name, "messages": [{"role": "user", "content": marker}], "max_tokens": 4,
        "ignore_eos": True})
    assert response.status_code == 200
    usage = response.json()["usage"]
    # Ray writes the replica's log lines to the worker's stderr file and to Serve's replica log
    # file (logs/serve/replica_<app>_<deployment>_<id>.log, what Ray's dashboard shows).
    logs = str(server.logs_dir)
    files = lambda: [path for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True)  # noqa: E731
                     if os.path.isfile(path)]
    deadline, found = time.monotonic() + 30, {}
    while len(found) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        found = {path: line.split(" -- ", 1)[-1] for path in files() for line in open(path, errors="replace")
                 if f"request_id={request_id} method=" in line}
    assert any(os.path.basename(path).startswith("replica_llm_VLLMServer_") for path in found), found
    lines = set(found.values())
    assert len(lines) == 1, lines  # one line per request (the same line is in both files)
    [line] = lines
    assert "method=POST route=/v1/chat/completions key=default status=200" in line
    # The tokens counted at the engine are the usage vLLM reported to the client.
    assert f"prompt_tokens={usage['prompt_tokens']} completion_tokens=4 " in line and "latency_ms=" in line
    everything = "".join(open(path, errors="replace").read() for path in files())
    assert marker not in everything  # serving.logPrompts is off
    assert API_KEY not in everything

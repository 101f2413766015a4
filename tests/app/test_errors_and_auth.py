"""Bad requests get OpenAI's error shape with a 4xx status, never a 500; auth guards every /v1 route."""

import pytest

from tests.app.conftest import API_KEY, MAX_MODEL_LEN

pytestmark = pytest.mark.engine

HELLO = [{"role": "user", "content": "Hello"}]


def _assert_openai_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


CHAT_ERRORS = [
    pytest.param(lambda m: {"messages": HELLO}, "model", id="missing-model"),
    pytest.param(lambda m: {"model": "gpt-4o", "messages": HELLO}, "model", id="unknown-model"),
    pytest.param(lambda m: {"model": m}, "messages", id="missing-messages"),
    pytest.param(lambda m: {"model": m, "messages": []}, "messages", id="empty-messages"),
    pytest.param(lambda m: {"model": m, "messages": "hello"}, "messages", id="messages-not-a-list"),
    pytest.param(lambda m: {"model": m, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role",
                 id="unknown-role"),
    pytest.param(lambda m: {"model": m, "messages": [{"role": "user", "content": [{"type": "image_url",
                 "image_url": {"url": "http://x"}}]}]}, "messages.0.content.0.type", id="image-content"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "max_tokens": "ten"}, "max_tokens", id="max-tokens-string"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "temperature": 3}, "temperature", id="temperature-over-2"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "top_p": 0}, "top_p", id="top-p-zero"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "n": 0}, "n", id="n-zero"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "stream": "yes"}, "stream", id="stream-not-bool"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "stop": ""}, "stop", id="empty-stop"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "logprobs": True}, "logprobs", id="logprobs"),
    pytest.param(lambda m: {"model": m, "messages": HELLO, "max_tokens": MAX_MODEL_LEN}, "max_tokens",
                 id="max-tokens-beyond-context"),
    pytest.param(lambda m: {"model": m, "messages": [{"role": "user", "content": "word " * (MAX_MODEL_LEN + 10)}]},
                 "messages", id="prompt-longer-than-context"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("make_body, param", CHAT_ERRORS)
def test_bad_chat_requests_should_get_400_before_any_stream(http, model_name, make_body, param, stream):
    body = make_body(model_name)
    if stream:
        body["stream"] = True if body.get("stream") is None else body["stream"]
    response = http.post("/v1/chat/completions", json=body)
    _assert_openai_error(response, 400, param=param)
    assert response.headers["content-type"].startswith("application/json")


def test_context_errors_should_say_what_to_change(http, model_name):
    error = _assert_openai_error(http.post("/v1/chat/completions", json={
        "model": model_name, "messages": HELLO, "max_tokens": MAX_MODEL_LEN}), 400, code="context_length_exceeded")
    assert "Lower max_tokens" in error["message"]


def test_unknown_model_should_name_the_served_model(http, model_name):
    error = _assert_openai_error(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}),
                                 400, param="model", code="model_not_found")
    assert model_name in error["message"]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"just a string"'],
                         ids=["broken", "empty", "array", "string"])
def test_malformed_bodies_should_get_400(http, body):
    response = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    _assert_openai_error(response, 400)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "MODEL"}, "prompt"),
    ({"model": "MODEL", "prompt": ""}, "prompt"),
    ({"model": "MODEL", "prompt": []}, "prompt"),
    ({"model": "MODEL", "prompt": [1, 2, 3]}, "prompt"),
    ({"model": "MODEL", "prompt": "x", "echo": True}, "echo"),
    ({"model": "MODEL", "prompt": ["a", "b"], "stream": True}, "prompt"),
], ids=["missing-model", "missing-prompt", "empty-prompt", "empty-list", "token-ids", "echo", "stream-of-many"])
def test_bad_completion_requests_should_get_400(http, model_name, body, param):
    body = {key: model_name if value == "MODEL" else value for key, value in body.items()}
    response = http.post("/v1/completions", json=body)
    error = _assert_openai_error(response, 400)
    assert (error["param"] or "").split(".")[0] == param


def test_unknown_routes_should_get_an_openai_shaped_404(http):
    _assert_openai_error(http.get("/v1/engines"), 404)


def test_wrong_method_should_get_405(http):
    _assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_request_id_should_be_echoed_or_generated(http, model_name):
    response = http.post("/v1/chat/completions", json={"model": model_name, "messages": HELLO, "max_tokens": 1},
                         headers={"X-Request-Id": "trace-abc-123"})
    assert response.headers["x-request-id"] == "trace-abc-123"
    generated = http.post("/v1/chat/completions", json={"model": model_name, "messages": HELLO, "max_tokens": 1})
    assert generated.headers["x-request-id"]


class TestAuth:
    @pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                              ("/v1/completions", "POST")])
    @pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {API_KEY}", "Bearer"],
                             ids=["none", "wrong-key", "wrong-scheme", "empty"])
    def test_requests_without_the_right_key_should_get_401(self, server, path, method, header):
        import httpx

        headers = {"Authorization": header} if header else {}
        response = httpx.request(method, server.url + path, headers=headers, json={}, timeout=30)
        _assert_openai_error(response, 401, code="invalid_api_key")
        assert API_KEY not in response.text

    def test_the_right_key_should_get_200(self, http):
        assert http.get("/v1/models").status_code == 200

    def test_health_should_stay_open(self, server):
        import httpx

        response = httpx.get(server.url + "/health", timeout=30)
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_a_model_without_a_chat_template_should_get_a_clear_400(server, model_name):
    import httpx

    from tests.app.conftest import NO_TEMPLATE_ROUTE

    base = server.url + NO_TEMPLATE_ROUTE
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": model_name, "messages": HELLO, "max_tokens": 4})
    error = _assert_openai_error(response, 400, param="messages", code="no_chat_template")
    assert "model.chatTemplate" in error["message"]
    # Plain completions need no template and still work.
    completion = httpx.post(base + "/v1/completions", headers=headers, timeout=60,
                            json={"model": model_name, "prompt": "The river", "max_tokens": 4})
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
    # Ray writes the replica's log lines to the worker's stderr file at once (and to Serve's replica
    # file when its buffer flushes): search every log of the session.
    logs = os.path.join(server._temp_dir, "session_latest", "logs")
    files = lambda: [path for path in glob.glob(os.path.join(logs, "**", "*"), recursive=True)  # noqa: E731
                     if os.path.isfile(path)]
    deadline, lines = time.monotonic() + 30, []
    while not lines and time.monotonic() < deadline:
        time.sleep(0.5)
        lines = {line.split(" -- ", 1)[-1] for path in files() for line in open(path, errors="replace")
                 if f"request_id={request_id} route=" in line}
    assert len(lines) == 1, lines  # one line per request (the same line may be in two files)
    [line] = lines
    assert "route=/v1/chat/completions status=200" in line
    assert "completion_tokens=4" in line and "prompt_tokens=" in line and "latency_ms=" in line
    everything = "".join(open(path, errors="replace").read() for path in files())
    assert marker not in everything  # serving.logPrompts is off
    assert API_KEY not in everything

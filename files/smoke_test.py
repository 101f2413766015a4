"""Smoke test of a live vllm-rayservice endpoint; `helm test` runs it in a pod.

Standard library only, so any image with Python 3 runs it. Configured by environment:
  SMOKE_TEST_URL      base URL of the endpoint, e.g. http://my-llm-serve-svc.default.svc:8000
  SMOKE_TEST_MODEL    the served model name
  SMOKE_TEST_API_KEY  the endpoint's API key; when set, a request without it must get 401
  SMOKE_TEST_TIMEOUT  seconds each request may take (default 120)
Exits 0 when every check passes; otherwise prints which check failed and what came back, exits 1.
"""

import json
import os
import sys
import urllib.error
import urllib.request


class CheckFailed(Exception):
    pass


def call(method, url, body=None, api_key=None, timeout=120.0):
    """One HTTP request; returns (status, headers, body text). HTTP errors are answers, not exceptions."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode(errors="replace")


def expect_status(name, got, want, text):
    if got != want:
        raise CheckFailed(f"{name}: expected HTTP {want}, got {got}: {text[:500]}")


def check_models(base, model, key, timeout):
    status, _, text = call("GET", f"{base}/v1/models", api_key=key, timeout=timeout)
    expect_status("GET /v1/models", status, 200, text)
    ids = [entry.get("id") for entry in json.loads(text).get("data", [])]
    if model not in ids:
        raise CheckFailed(f"GET /v1/models: {model!r} is not among the served models {ids}")


def check_chat(base, model, key, timeout):
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
    status, _, text = call("POST", f"{base}/v1/chat/completions", body, key, timeout)
    expect_status("POST /v1/chat/completions", status, 200, text)
    answer = json.loads(text)
    choice = (answer.get("choices") or [{}])[0]
    if choice.get("message", {}).get("role") != "assistant":
        raise CheckFailed(f"POST /v1/chat/completions: no assistant message in {text[:500]}")
    if not answer.get("usage", {}).get("completion_tokens"):
        raise CheckFailed(f"POST /v1/chat/completions: no completion tokens counted in {text[:500]}")


def check_chat_stream(base, model, key, timeout):
    body = {"model": model, "messages": [{"role": "user", "content": "Count to three."}],
            "max_tokens": 16, "stream": True}
    status, _, text = call("POST", f"{base}/v1/chat/completions", body, key, timeout)
    expect_status("streaming POST /v1/chat/completions", status, 200, text)
    frames = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    if not frames or frames[-1] != "[DONE]":
        raise CheckFailed(f"streaming chat: the stream did not end with 'data: [DONE]': ...{text[-300:]}")
    chunks = [json.loads(frame) for frame in frames[:-1]]
    if any("error" in chunk for chunk in chunks):
        raise CheckFailed(f"streaming chat: the stream carried an error: {text[:500]}")
    if not chunks or chunks[0]["choices"][0]["delta"].get("role") != "assistant":
        raise CheckFailed(f"streaming chat: the first chunk does not carry the assistant role: {text[:300]}")


def check_json_schema(base, model, key, timeout):
    """JSON mode as agent frameworks use it: the answer must be valid against the schema sent."""
    schema = {"type": "object", "properties": {"greeting": {"type": "string", "enum": ["hello", "hi"]}},
              "required": ["greeting"], "additionalProperties": False}
    body = {"model": model, "messages": [{"role": "user", "content": "Greet me in JSON."}], "max_tokens": 64,
            "temperature": 1.0, "seed": 5,
            "response_format": {"type": "json_schema", "json_schema": {"name": "greeting", "schema": schema}}}
    status, _, text = call("POST", f"{base}/v1/chat/completions", body, key, timeout)
    expect_status("POST /v1/chat/completions with a json_schema", status, 200, text)
    content = json.loads(text)["choices"][0]["message"]["content"]
    try:
        answer = json.loads(content)
    except ValueError:
        raise CheckFailed(f"json_schema: the answer is not JSON: {content[:300]!r}") from None
    if not isinstance(answer, dict) or set(answer) != {"greeting"} or answer["greeting"] not in ("hello", "hi"):
        raise CheckFailed(f"json_schema: the answer does not follow the schema: {content[:300]!r}")


def check_auth_required(base, model, timeout):
    status, _, text = call("GET", f"{base}/v1/models", timeout=timeout)
    expect_status("GET /v1/models without the API key", status, 401, text)


def main():
    base = os.environ.get("SMOKE_TEST_URL", "http://127.0.0.1:8000").rstrip("/")
    model = os.environ.get("SMOKE_TEST_MODEL", "")
    key = os.environ.get("SMOKE_TEST_API_KEY") or None
    timeout = float(os.environ.get("SMOKE_TEST_TIMEOUT", "120"))
    checks = [
        ("models", lambda: check_models(base, model, key, timeout)),
        ("chat", lambda: check_chat(base, model, key, timeout)),
        ("chat-stream", lambda: check_chat_stream(base, model, key, timeout)),
        ("json-schema", lambda: check_json_schema(base, model, key, timeout)),
    ]
    if key:
        checks.append(("auth", lambda: check_auth_required(base, model, timeout)))
    for name, check in checks:
        try:
            check()
        except CheckFailed as failure:
            print(f"FAIL {name}: {failure}", flush=True)
            return 1
        except (OSError, ValueError, KeyError, IndexError) as error:
            print(f"FAIL {name}: {base} did not answer as expected: {error!r}", flush=True)
            return 1
        print(f"ok   {name}", flush=True)
    print(f"all {len(checks)} checks passed against {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

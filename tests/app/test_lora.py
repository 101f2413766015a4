"""LoRA adapters on the real engine: listed in values, loaded on first use from the adapters
folder, served like vLLM's own server serves them, and bad ones never costing the replica.

The app under test is the chart's serveConfigV2 with lora.* values, added as a fourth application
(/lora) to the session's local Ray for this module only, and removed after it. Its adapters volume
is a local folder holding tiny adapters built here (tools/tiny_lora.py): two good ones, and three
bad ones listed in values (a rank above lora.maxLoraRank, a corrupt weights file, a missing path).
vLLM's own server, given the same arguments, is the reference for the parity cases.
"""

import copy
import glob
import json
import os
import shutil
import time

import httpx
import pytest

from bench import servers
from tests.app.conftest import API_KEY, SERVED_NAME
from tests.app.test_usage_and_keys import COMPLETION_TOKENS, total_for, wait_for_metrics
from tests.app.test_vllm_parity import Case, normalize, send
from tools import serve_local, tiny_lora

pytestmark = pytest.mark.engine

PREFIX = "/lora"
MAX_LORA_RANK = 8
GOOD = ["tiny-lora-a", "tiny-lora-b"]
# Listed in values, and not servable: each is left out, with its reason in the replica's log. A
# request for one gets a 4xx: vLLM's 404 for a name it does not serve, or, when a folder of that name
# is in the volume, vLLM's 400 from loadOnFirstUse trying it again.
BAD = {"too-big-rank": ("LoRA rank 16 is greater than max_lora_rank 8", 400),
       "corrupt": ("Error while deserializing header", 400),
       "missing": ("No adapter found", 404)}
# In the folder only: loadOnFirstUse finds it and vLLM cannot load it (its 400).
BROKEN_IN_FOLDER = "broken-in-folder"
HELLO = [{"role": "user", "content": "Hello, how are you?"}]
GREEDY = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, tmp_path_factory):
    """The adapters volume: one folder per adapter, as a user fills it."""
    folder = tmp_path_factory.mktemp("lora-adapters")
    for seed, name in enumerate(GOOD, start=1):
        tiny_lora.build(tiny_model_dir, folder / name, rank=MAX_LORA_RANK, seed=seed)
    tiny_lora.build(tiny_model_dir, folder / "too-big-rank", rank=16, seed=3)
    tiny_lora.build(tiny_model_dir, folder / "corrupt", rank=MAX_LORA_RANK, seed=4)
    (folder / "corrupt" / "adapter_model.safetensors").write_bytes(b"not a safetensors file" * 64)
    tiny_lora.build(tiny_model_dir, folder / BROKEN_IN_FOLDER, rank=MAX_LORA_RANK, seed=5)
    (folder / BROKEN_IN_FOLDER / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    return folder


def lora_values(adapters_dir):
    adapters = [{"name": name, "path": name} for name in [*GOOD, "too-big-rank", "corrupt"]]
    adapters.append({"name": "missing", "path": "not-there"})
    return {
        "model": {"servedName": SERVED_NAME},
        "engine": {"maxModelLen": 512},
        "serving": {"apiKey": {"value": API_KEY}, "maxOngoingRequests": 16, "maxQueuedRequests": 16},
        # The folder stands for the volume: mounted where the pods would mount it.
        "lora": {"enabled": True, "maxLoras": 2, "maxLoraRank": MAX_LORA_RANK, "adapters": adapters,
                 "loadOnFirstUse": True, "volume": {"enabled": True, "mountPath": str(adapters_dir)}},
    }


@pytest.fixture(scope="module")
def lora_app(server, tiny_model_dir, adapters_dir):
    """The chart's LoRA app, deployed beside the session's apps, and removed after this module."""
    config, _ = serve_local.local_serve_config([serve_local.DEFAULT_VALUES], model=str(tiny_model_dir),
                                               port=server.port, values=lora_values(adapters_dir))
    [app] = config["applications"]
    app.update(name="lora", route_prefix=PREFIX)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0
    app["deployments"][0]["graceful_shutdown_timeout_s"] = 5  # nothing is in flight when it goes
    original = server.config
    server.config = {**original, "applications": [*original["applications"], app]}
    started = time.monotonic()
    try:
        server.submit()
        server.wait_running()
        print(f"\nLoRA app RUNNING after {time.monotonic() - started:.1f}s")
        yield app
    finally:
        server.config = original
        server.submit()
        # Serve is removing it once it says DELETING; the rest (HAProxy's 30 s drain of its replica,
        # the engine's shutdown) goes on while the next module runs, and never touches its apps.
        deadline = time.monotonic() + 60
        while server.status().get("applications", {}).get("lora", {}).get("status") not in (None, "DELETING") \
                and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture
def http(server, lora_app):
    with httpx.Client(base_url=server.url + PREFIX, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as raw:
        yield raw


@pytest.fixture(scope="module")
def lora_stats(lora_app):
    from ray import serve

    handle = serve.get_app_handle("lora")
    return lambda: handle.get_stats.remote().result(timeout_s=30)


def chat(http, model, **fields):
    response = http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, **GREEDY, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def models(http) -> dict:
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    return {card["id"]: card for card in response.json()["data"]}


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["message"], response.text
    return error


# -- Adapters from values -------------------------------------------------------------------------

def test_models_should_list_each_listed_adapter_with_the_model_as_parent(http, adapters_dir):
    cards = models(http)
    assert set(cards) == {SERVED_NAME, *GOOD}, cards  # the bad ones are left out
    for name in GOOD:
        assert cards[name]["parent"] == SERVED_NAME, cards[name]
        assert cards[name]["root"] == str(adapters_dir / name), cards[name]


def test_an_adapter_should_change_the_greedy_output(http):
    """An adapter that vLLM ignored would answer as the model does: this fails then."""
    base = chat(http, SERVED_NAME)["choices"][0]["message"]["content"]
    answers = {name: chat(http, name) for name in GOOD}
    for name, answer in answers.items():
        assert answer["model"] == name, answer
        text = answer["choices"][0]["message"]["content"]
        assert text != base, (name, text, base)
        assert chat(http, name)["choices"][0]["message"]["content"] == text  # greedy: the same again
    texts = [answer["choices"][0]["message"]["content"] for answer in answers.values()]
    assert texts[0] != texts[1], texts  # each adapter its own weights


def test_completions_should_work_with_an_adapter(http):
    body = {"prompt": "The river flows past the mountain city at night, and the light", **GREEDY}
    base = http.post("/v1/completions", json={"model": SERVED_NAME, **body})
    tuned = http.post("/v1/completions", json={"model": GOOD[0], **body})
    assert base.status_code == tuned.status_code == 200, (base.text, tuned.text)
    assert tuned.json()["model"] == GOOD[0]
    assert tuned.json()["choices"][0]["text"] != base.json()["choices"][0]["text"], tuned.text
    assert tuned.json()["usage"]["completion_tokens"] == GREEDY["max_tokens"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_with_an_adapter_should_carry_its_name_and_its_text(http, route):
    body = {"messages": HELLO} if "chat" in route else {"prompt": "The river flows past the mountain city at night"}
    body.update(GREEDY, model=GOOD[1], stream=True, stream_options={"include_usage": True})
    response = http.post(route, json=body)
    assert response.status_code == 200, response.text
    events = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", response.text[-500:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {GOOD[1]}
    streamed = "".join((choice.get("delta") or {}).get("content") or choice.get("text") or ""
                       for chunk in chunks for choice in chunk["choices"])
    body.pop("stream_options")
    plain = http.post(route, json={**body, "stream": False})
    assert plain.status_code == 200, plain.text
    plain = plain.json()["choices"][0]
    assert streamed == (plain["message"]["content"] if "chat" in route else plain["text"])
    assert chunks[-1]["usage"]["completion_tokens"] == GREEDY["max_tokens"]


def test_an_unknown_adapter_should_get_vllms_404(http):
    error = assert_openai_error(http.post("/v1/chat/completions", json={"model": "no-such-adapter",
                                                                        "messages": HELLO}), 404)
    assert error["message"] == "The model `no-such-adapter` does not exist.", error


@pytest.mark.parametrize("name", [f"../{{}}/{GOOD[0]}", f"{GOOD[0]}/.", "./" + GOOD[0], "{}/" + GOOD[0]])
def test_the_resolver_should_not_take_a_path_for_a_name(http, adapters_dir, name):
    """vLLM's own server would load these (its resolver joins the name to the folder): the same
    adapter again under another name, or one from outside the volume."""
    name = name.format(adapters_dir.name) if name.startswith("../") else name.format(adapters_dir)
    error = assert_openai_error(http.post("/v1/chat/completions", json={"model": name, "messages": HELLO}), 404)
    # vLLM's 404 (it writes an absolute path as `<path>` in the message).
    assert error["type"] == "NotFoundError" and error["message"].endswith("does not exist."), error
    assert name not in models(http)


@pytest.mark.parametrize("route", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_vllms_adapter_admin_routes_should_stay_closed(http, adapters_dir, route):
    """Runtime LoRA updating is on (loadOnFirstUse), so vLLM mounts them: the gate does not pass them."""
    response = http.post(route, json={"lora_name": "sneaky", "lora_path": str(adapters_dir / GOOD[0])})
    error = assert_openai_error(response, 404)
    assert error["code"] == "not_found", error
    assert "sneaky" not in models(http)


def test_the_log_line_and_the_counters_should_name_the_adapter(server, http, lora_app):
    request_id = f"lora-log-{time.time_ns()}"
    response = http.post("/v1/chat/completions", headers={"X-Request-Id": request_id},
                         json={"model": GOOD[0], "messages": HELLO, **GREEDY})
    assert response.status_code == 200, response.text
    [line] = replica_log_lines(server, f"request_id={request_id} ")
    assert f"key=default status=200 model={GOOD[0]} " in line, line
    assert f"completion_tokens={GREEDY['max_tokens']} " in line, line

    def counted(text):
        return total_for(text, COMPLETION_TOKENS, key="default", model=GOOD[0])

    text = wait_for_metrics(server, lambda text: counted(text) >= GREEDY["max_tokens"])
    assert counted(text) >= GREEDY["max_tokens"], [line for line in text.splitlines() if COMPLETION_TOKENS in line]


# -- Bad adapters ---------------------------------------------------------------------------------

def test_bad_listed_adapters_should_be_left_out_with_their_reason_and_a_404(server, http, lora_stats):
    for name, (reason, status) in BAD.items():
        error = assert_openai_error(http.post("/v1/chat/completions", json={"model": name, "messages": HELLO}), status)
        assert name in error["message"]
        [line] = replica_log_lines(server, f"LoRA adapter '{name}' (")
        assert "is not served" in line and reason in line, line
    # The replica serves the model and the good adapters.
    assert set(lora_stats()["lora_adapters"]) >= set(GOOD)
    assert chat(http, GOOD[0])["model"] == GOOD[0]


def test_a_broken_adapter_in_the_folder_should_get_vllms_400_and_the_replica_should_stay(http, lora_stats):
    pid = lora_stats()["pid"]
    error = assert_openai_error(http.post("/v1/chat/completions", json={"model": BROKEN_IN_FOLDER,
                                                                        "messages": HELLO}), 400)
    assert error["message"] == f"LoRA adapter '{BROKEN_IN_FOLDER}' was found but could not be loaded.", error
    assert BROKEN_IN_FOLDER not in models(http)
    assert chat(http, GOOD[1])["model"] == GOOD[1] and chat(http, SERVED_NAME)["model"] == SERVED_NAME
    assert http.get("/health").status_code == 200
    assert lora_stats()["pid"] == pid  # the same replica process


# -- Parity with vLLM's own server, given the same adapters -------------------------------------------

def reference_config(lora_app):
    """The LoRA app's args without the adapters vLLM's server cannot start with (it stops at the
    first it cannot load, where the app leaves it out)."""
    app = copy.deepcopy(lora_app)
    lora = app["args"]["lora"]
    lora["adapters"] = [adapter for adapter in lora["adapters"] if adapter["name"] not in BAD]
    return {"applications": [app]}


@pytest.fixture(scope="module")
def reference(lora_app):
    """vLLM's server with the app's arguments and environment (the resolver on the same folder)."""
    import vllm_app  # bench.servers put files/ on sys.path

    config = reference_config(lora_app)
    args = vllm_app.AppArgs.model_validate(config["applications"][0]["args"])
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **vllm_app.vllm_environment_settings(args, environ={})}
    with servers.vllm_server(config, serve_local.free_port(), env) as url:
        yield url


def _chat(model, **fields):
    return {"model": model, "messages": HELLO, "max_tokens": 12, "temperature": 0, **fields}


def _completion(model, **fields):
    return {"model": model, "prompt": "The river flows past the mountain city at night", "max_tokens": 12,
            "temperature": 0, **fields}


A, B = GOOD
PARITY_CASES = [
    Case("models", "/v1/models", method="GET"),
    Case("chat-adapter-greedy", "/v1/chat/completions", _chat(A)),
    Case("chat-other-adapter-logprobs", "/v1/chat/completions", _chat(B, logprobs=True, top_logprobs=2, max_tokens=5)),
    Case("chat-adapter-seeded-n", "/v1/chat/completions", _chat(A, n=2, temperature=1.0, seed=7)),
    Case("chat-adapter-stream", "/v1/chat/completions",
         _chat(B, stream=True, stream_options={"include_usage": True}), stream=True),
    Case("completion-adapter-greedy", "/v1/completions", _completion(A)),
    Case("completion-adapter-stream", "/v1/completions",
         _completion(B, stream=True, stream_options={"include_usage": True}), stream=True),
    Case("chat-base-model", "/v1/chat/completions", _chat(SERVED_NAME)),
    Case("tokenize-adapter", "/tokenize", {"model": A, "prompt": "Hello world"}),
    Case("bad-unknown-adapter", "/v1/chat/completions", _chat("no-such-adapter")),
    Case("bad-unknown-adapter-stream", "/v1/completions", _completion("no-such-adapter", stream=True)),
    Case("bad-broken-adapter-in-folder", "/v1/chat/completions", _chat(BROKEN_IN_FOLDER)),
    Case("bad-adapter-beyond-context", "/v1/chat/completions", _chat(A, max_tokens=512)),
]


@pytest.mark.parametrize("case", [case.param() for case in PARITY_CASES])
def test_adapters_should_be_served_as_vllms_own_server_serves_them(server, lora_app, reference, case):
    theirs_status, theirs = send(reference, case, {})
    ours_status, ours = send(server.url + PREFIX, case, {"Authorization": f"Bearer {API_KEY}"})
    assert ours_status == theirs_status, (ours, theirs)
    assert normalize(ours) == normalize(theirs), (ours, theirs)
    assert (400 <= ours_status < 500) if case.id.startswith("bad-") else ours_status == 200, ours


# -- Load on first use (after the parity cases, which compare /v1/models) ---------------------------

def test_an_adapter_dropped_into_the_folder_should_be_served_on_first_use(http, adapters_dir, tiny_model_dir,
                                                                         lora_stats):
    name = "dropped-later"
    assert name not in models(http)
    pid = lora_stats()["pid"]
    # Written aside, then moved in whole, as a copy onto the volume should be.
    staging = adapters_dir.parent / f"staging-{name}"
    tiny_lora.build(tiny_model_dir, staging, rank=MAX_LORA_RANK, seed=6)
    shutil.move(str(staging), str(adapters_dir / name))
    base = chat(http, SERVED_NAME)["choices"][0]["message"]["content"]

    started = time.monotonic()
    first = chat(http, name)
    first_s = time.monotonic() - started
    started = time.monotonic()
    again = chat(http, name)
    again_s = time.monotonic() - started
    print(f"\nfirst use of {name}: {first_s * 1000:.0f} ms; the next request: {again_s * 1000:.0f} ms")

    assert first["model"] == name
    text = first["choices"][0]["message"]["content"]
    assert text != base and again["choices"][0]["message"]["content"] == text, (text, base)
    cards = models(http)
    assert cards[name]["parent"] == SERVED_NAME and cards[name]["root"] == str(adapters_dir / name), cards
    assert name in lora_stats()["lora_adapters"] and lora_stats()["pid"] == pid


def replica_log_lines(server, marker: str, timeout: float = 30) -> list[str]:
    """The lines of the LoRA app's replica log that contain `marker` (once each: Ray writes them
    to Serve's replica log file and to the worker's stderr)."""
    logs = os.path.join(server._temp_dir, "session_latest", "logs")
    deadline, found = time.monotonic() + timeout, {}
    while not found and time.monotonic() < deadline:
        time.sleep(0.5)
        for path in glob.glob(os.path.join(logs, "serve", "replica_lora_VLLMServer_*.log")):
            with open(path, errors="replace") as log:
                found.update({line.split(" -- ", 1)[-1].strip(): None for line in log if marker in line})
    return list(found)

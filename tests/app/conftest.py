"""The app under test: the chart's own serveConfigV2 (CPU profile), submitted to a real local Ray
through the dashboard's REST API as KubeRay does, serving the tiny model on the real vLLM CPU engine.

One server per test session (engine start costs ~30 s). Its settings are the CPU scenario's, plus
what these tests need: an API key, a queue limit small enough to overflow, and a longer context.
"""

import copy
import shutil
from pathlib import Path

import httpx
import openai
import pytest

from tests import failure_context
from tools import serve_local, tiny_model

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
SERVED_NAME = "tiny-llama"
MAX_ONGOING = 16
MAX_QUEUED = 16  # Serve counts a burst waiting for assignment here, so it must hold a burst
MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_model.build(REPO / "build" / "tiny-llama")


@pytest.fixture(scope="session")
def no_template_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its chat template removed, as some base models ship."""
    target = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny_model_dir, target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = target / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_chat_template"'))
    return target


NO_TEMPLATE_ROUTE = "/no-template"
EMBED_ROUTE = "/embed"
COLD_ROUTE = "/cold"


NAMED_KEYS = {"team-a": "key-of-team-a-123", "team-b": "key-of-team-b-456"}
# A named key with a quota of one request a minute (serving.keyPolicies), so that the monitoring
# tests see 429s in the quota panels and the throttled-key alert.
THROTTLED_KEY = ("throttled", "key-of-throttled-789")


@pytest.fixture(scope="session")
def named_keys_dir(tmp_path_factory):
    """What the kubelet makes of the named-keys Secret: one file per key, named after it."""
    folder = tmp_path_factory.mktemp("api-keys")
    for name, key in [*NAMED_KEYS.items(), THROTTLED_KEY]:
        (folder / name).write_text(key)
    return folder


@pytest.fixture(scope="session")
def server(tiny_model_dir, no_template_model_dir, named_keys_dir):
    values = {
        "model": {"servedName": SERVED_NAME},
        # JSON grammars without free whitespace: a random-weight model otherwise loops on blanks
        # until max_tokens and never closes a tool call or a JSON object.
        "engine": {"maxModelLen": MAX_MODEL_LEN, "extraArgs": {"structured_outputs_config": {
            "backend": "xgrammar", "disable_any_whitespace": True}}},
        # Tool calling as a user would set it up. The pythonic parser constrains named and required
        # tool calls with a JSON schema (hermes uses a structural tag that allows free whitespace);
        # the tiny model never writes a call by itself, so `auto` answers in text.
        "openai": {"toolCallParser": "pythonic", "enableAutoToolChoice": True},
        "serving": {"apiKey": {"value": API_KEY}, "maxOngoingRequests": MAX_ONGOING,
                    "maxQueuedRequests": MAX_QUEUED,
                    # These tests are not the watchdog's (tests/faults is): four engines share 2 cores
                    # here, and a request once waited over 10 s for its first step.
                    "engineStallSeconds": 120,
                    "keyPolicies": {THROTTLED_KEY[0]: {"requestsPerMinute": 1}}},
    }
    config, merged = serve_local.local_serve_config(
        [serve_local.DEFAULT_VALUES], model=str(tiny_model_dir), port=serve_local.free_port(), values=values)
    [app] = config["applications"]
    # The chart mounts the named-keys Secret here on the pods; locally it is a folder we write.
    app["args"]["serving"]["apiKeysDir"] = str(named_keys_dir)
    # A second app on the same Ray: a model without a chat template, to check the 400 it must get.
    bare = copy.deepcopy(app)
    bare.update(name="no-template", route_prefix=NO_TEMPLATE_ROUTE)
    bare["args"]["model"].update(id=str(no_template_model_dir), servedName=SERVED_NAME)
    bare["args"]["engine"]["maxModelLen"] = 512
    bare["deployments"][0]["ray_actor_options"]["num_cpus"] = 0
    config["applications"].append(bare)
    # A third: the same weights served as an embedding model, for vLLM's pooling routes.
    embed = copy.deepcopy(bare)
    embed.update(name="embed", route_prefix=EMBED_ROUTE)
    embed["args"]["model"]["id"] = str(tiny_model_dir)
    embed["args"]["engine"]["extraArgs"] = {"runner": "pooling", "convert": "embed"}
    config["applications"].append(embed)
    # A fourth, without the warm-up: its engine's first request is the one tests/app/test_cold_start.py sends.
    cold = copy.deepcopy(bare)
    cold.update(name="cold", route_prefix=COLD_ROUTE)
    cold["args"]["model"]["id"] = str(tiny_model_dir)
    cold["args"]["serving"]["warmup"] = False
    config["applications"].append(cold)
    with serve_local.LocalServe(config, api_key=serve_local.api_key_from(merged), values=merged,
                                dashboard_port=serve_local.free_port(), extra_env={"HF_HUB_OFFLINE": "1"}) as running:
        failure_context.watch(running)
        yield running
        failure_context.unwatch(running)


@pytest.fixture(scope="session")
def model_name():
    return SERVED_NAME


@pytest.fixture
def client(server):
    # No retries: the tests must see each status the server really sends.
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


@pytest.fixture
def async_client(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture
def http(server):
    """Raw HTTP with the key; pass headers={} to drop it."""
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as raw:
        yield raw


@pytest.fixture
def app_stats(server):
    """The replica's counters, read through a Serve handle (the test process is the Ray driver)."""
    from ray import serve

    handle = serve.get_app_handle("llm")
    return lambda: handle.get_stats.remote().result(timeout_s=30)

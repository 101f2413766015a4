"""A fresh replica serves a short first prompt, and a replica warms its engine up before traffic.

On Intel CPUs with AMX, vLLM 0.29's CPU worker died with SIGILL when its first prefill was a few
tokens long (files/vllm_app_worker.py says why and what the app does about it). The "cold" app of
tests/app/conftest.py runs without the warm-up, so the request below is its engine's very first.
On a CPU without AMX this test passes with or without the fix; on one with AMX it fails without it.
"""

import os
import re

import httpx
import pytest

from tests.app.conftest import API_KEY, COLD_ROUTE

pytestmark = pytest.mark.engine


def test_a_fresh_replicas_first_request_may_be_a_2_token_prompt(server, model_name):
    from ray import serve

    cold = serve.get_app_handle("cold")
    assert cold.get_stats.remote().result(timeout_s=30)["requests"] == 0, "the cold app served a request before"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    tokens = httpx.post(server.url + COLD_ROUTE + "/tokenize", headers=headers, timeout=60,
                        json={"model": model_name, "prompt": "The river", "add_special_tokens": True})
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["count"] <= 3  # the tokenizer's BOS and two or fewer tokens of text
    answer = httpx.post(server.url + COLD_ROUTE + "/v1/completions", headers=headers, timeout=120,
                        json={"model": model_name, "prompt": "The river", "max_tokens": 4, "ignore_eos": True,
                              "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 4
    # The engine lived through it: a second request is served too.
    again = httpx.post(server.url + COLD_ROUTE + "/v1/completions", headers=headers, timeout=120,
                       json={"model": model_name, "prompt": "A", "max_tokens": 2, "temperature": 0})
    assert again.status_code == 200, again.text


def _replica_logs(server) -> str:
    return "".join(path.read_text(errors="replace") for path in (server.logs_dir / "serve").glob("replica_llm_*.log"))


def test_a_replica_should_warm_its_engine_up_before_it_takes_traffic(server):
    """The warm-up's time is logged: what it adds to a replica's start."""
    found = re.findall(r"Warm-up generation done in ([0-9.]+) s", _replica_logs(server))
    assert found, "no warm-up line in the llm app's replica log"
    assert all(float(seconds) < 60 for seconds in found)


def test_every_engine_worker_should_have_asked_for_amx_tiles_when_the_cpu_has_them():
    """The worker set-up's request, in a process of its own as vLLM's worker is: granted where the
    CPU has AMX tiles (then the permission is really in the process's set), else a plain no."""
    import subprocess
    import sys
    from pathlib import Path

    files = Path(__file__).resolve().parents[2] / "files"
    result = subprocess.run([sys.executable, "-c", "import vllm_app_worker; print(vllm_app_worker.AMX_TILES)"],
                            env={**os.environ, "PYTHONPATH": str(files)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    has_amx = "amx_tile" in open("/proc/cpuinfo").read()
    assert result.stdout.strip() == ("granted" if has_amx else "not on this CPU"), result.stdout + result.stderr

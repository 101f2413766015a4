"""What a failing test against the local stack prints, so that the next failure explains itself:
the last HTTP responses the test process received (status and body), and the tail of the local
Ray session's logs (the Serve replicas' and controller's log files, and the stderr of the Ray
workers, and the lines of their stdout where vLLM reports a dead engine worker).

A pytest plugin (tests/conftest.py loads it). A suite registers its running stack with
`watch(local_serve)`; every httpx request of the test process is recorded, the `openai` SDK's
included (it uses httpx).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Optional

import httpx
import pytest

RESPONSES_KEPT = 6
BODY_SHOWN = 1500
LOG_LINES = 40

_responses: collections.deque = collections.deque(maxlen=RESPONSES_KEPT)
_stacks: list = []


def watch(local_serve) -> None:
    """Report this tools.serve_local.LocalServe's logs when a test fails."""
    _stacks.append(local_serve)


def unwatch(local_serve) -> None:
    if local_serve in _stacks:
        _stacks.remove(local_serve)


def _record(send):
    def recording_send(self, request, *args, **kwargs):
        response = send(self, request, *args, **kwargs)
        _responses.append(response)
        return response

    return recording_send


def _record_async(send):
    async def recording_send(self, request, *args, **kwargs):
        response = await send(self, request, *args, **kwargs)
        _responses.append(response)
        return response

    return recording_send


httpx.Client.send = _record(httpx.Client.send)
httpx.AsyncClient.send = _record_async(httpx.AsyncClient.send)


def _describe(response: httpx.Response) -> str:
    request = response.request
    try:
        body = response.content.decode("utf-8", "replace")  # read already, unless it was a stream
    except httpx.ResponseNotRead:
        body = "<streamed; not kept>"
    if len(body) > BODY_SHOWN:
        body = body[:BODY_SHOWN] + f"... ({len(body)} characters)"
    return f"{request.method} {request.url} -> {response.status_code}\n  {body}"


NO_MATCH = "(none)"  # what _tail shows when no line matches its filter


def _tail(path: Path, lines: int = LOG_LINES, keep: Optional[re.Pattern] = None) -> str:
    """The file's last `lines` lines, or with `keep` its last lines that match it."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as error:
        return f"  (cannot read: {error})"
    if keep is not None:
        text = [line for line in text if keep.search(line)] or [NO_MATCH]
    return "\n".join("  " + line for line in text[-lines:])


# Why a Ray process went away (a Serve controller restarted mid-test once, with no trace in the Serve
# logs): the raylet logs its memory monitor's kills, the GCS every actor death and restart.
# Whole words only: the GCS's periodic debug state has counters named like
# actor_to_restart_for_lineage_reconstruction_callbacks_, which say nothing.
DEATH_WORDS = re.compile(r"memory monitor|OutOfMemory|\bKilling\b|\bkilled\b|\bdied\b|\brestart(ed|ing)?\b", re.IGNORECASE)
DEATH_LINES = 12
# vLLM logs a dead engine worker or EngineCore to stdout (the Ray workers' .out files), not stderr:
# "Worker proc VllmWorker-0 died unexpectedly (exit code: -4)" is the only line that names a SIGILL.
ENGINE_DEATH_WORDS = re.compile(r"died unexpectedly|exit code|encountered a fatal error|EngineDeadError")


def log_tails(local_serve) -> str:
    """The newest Serve replica logs, the controller's, and the newest Ray worker stderr files."""
    logs = local_serve.logs_dir
    if logs is None:
        return "(the local Ray is stopped: no logs)"

    def newest(pattern: str, count: int) -> list[Path]:
        return sorted(logs.glob(pattern), key=lambda path: path.stat().st_mtime)[-count:]

    parts = []
    for path in [*newest("serve/replica_*.log", 3), *newest("serve/controller_*.log", 1),
                 *newest("worker-*.err", 2)]:
        parts.append(f"--- {path.relative_to(logs)} (last {LOG_LINES} lines)\n{_tail(path)}")
    for path in [logs / "raylet.out", logs / "gcs_server.out"]:
        parts.append(f"--- {path.name}: kills, deaths and restarts\n{_tail(path, DEATH_LINES, keep=DEATH_WORDS)}")
    for path in newest("worker-*.out", 200):
        found = _tail(path, DEATH_LINES, keep=ENGINE_DEATH_WORDS)
        if found.strip() != NO_MATCH:  # only the workers that logged a death
            parts.append(f"--- {path.name}: vLLM engine deaths\n{found}")
    return "\n".join(parts) or f"(no logs under {logs})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    if _responses:
        report.sections.append(("last HTTP responses", "\n".join(_describe(r) for r in _responses)))
    for local_serve in _stacks:
        report.sections.append((f"local Ray logs ({local_serve.url})", log_tails(local_serve)))


@pytest.fixture(autouse=True)
def _fresh_responses():
    """Each test reports only its own responses."""
    _responses.clear()
    yield

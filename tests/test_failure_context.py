"""The failure report itself: a failing test must show what explains it, so check what it shows."""

from types import SimpleNamespace

from tests import failure_context


def test_the_report_shows_log_tails_and_why_ray_processes_died(tmp_path):
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "replica_llm_1.log").write_text("starting\nEngineCore encountered an issue\n")
    (tmp_path / "serve" / "controller_7.log").write_text("Controller starting\n")
    (tmp_path / "raylet.out").write_text(
        "heartbeat ok\n"
        "Killing worker with PID 4242 because the memory monitor found usage above 0.95\n"
        "heartbeat ok\n")
    (tmp_path / "gcs_server.out").write_text("Actor SERVE_CONTROLLER_ACTOR died, restarting (1/-1)\n"
                                             "- actor_to_restart_for_lineage_reconstruction_callbacks_: 0\n")

    (tmp_path / "worker-ab-01-77.out").write_text(
        "(EngineCore pid=6100) INFO loading weights\n"
        "(EngineCore pid=6100) ERROR [multiproc_executor.py:314] Worker proc VllmWorker-0 died unexpectedly "
        "(exit code: -4), shutting down executor.\n")
    (tmp_path / "worker-cd-01-78.out").write_text("(ServeReplica pid=1) INFO all well\n")

    report = failure_context.log_tails(SimpleNamespace(logs_dir=tmp_path))

    assert "EngineCore encountered an issue" in report
    assert "VllmWorker-0 died unexpectedly (exit code: -4)" in report  # a SIGILL says so only in stdout
    assert "loading weights" not in report and "worker-cd-01-78.out" not in report
    assert "Controller starting" in report
    assert "Killing worker with PID 4242" in report
    assert "SERVE_CONTROLLER_ACTOR died" in report
    assert "heartbeat ok" not in report  # only the lines that say why something went away
    assert "lineage_reconstruction" not in report


def test_a_stopped_stack_says_so():
    assert "stopped" in failure_context.log_tails(SimpleNamespace(logs_dir=None))

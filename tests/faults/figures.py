"""The Reliability table (docs/reliability.md) from the suite's figures (build/faults/figures.json):

    python -m tests.faults.figures
"""

import json
import sys
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[2] / "build" / "faults" / "figures.json"

ROWS = [
    ("engine_killed", "1. EngineCore SIGKILLed under 16 streams + 8 requests"),
    ("engine_hung", "7. EngineCore SIGSTOPped (hung) under 16 streams + 8 requests"),
    ("replica_killed", "2. Serve replica SIGKILLed under 16 streams + 8 requests"),
    ("rollout_2_replicas", "3. New code rolled out under load, 2 replicas"),
    ("rollout_1_replica", "3. New code rolled out under load, 1 replica"),
    ("overload", "4. 3 bursts of 4x the queue (2x ongoing + queued) at once"),
    ("hostile_fuzz", "5. Fuzzed bodies, methods and paths (hypothesis)"),
    ("soak", "6. Soak at concurrency 32"),
]


def table(figures: dict) -> str:
    lines = ["| scenario | sent | completed | clean errors | shed (503) | cut | hung | recovery |",
             "| --- | --: | --: | --: | --: | --: | --: | --- |"]
    for key, name in ROWS:
        row = figures["scenarios"].get(key)
        if row is None:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        if key == "hostile_fuzz":
            lines.append(f"| {name} | {row['sent']} | 0 x 5xx | all 4xx or 200 | – | 0 | 0 | no restart |")
            continue
        if key == "engine_hung":
            recovery = (f"requests ended {row['in_flight_ended_within_s']} s after the stop, /health 503 at "
                        f"{row['health_503_after_s']} s, first answer at {row['recovery_s']} s "
                        f"(engineStallSeconds {row['engine_stall_s']})")
        elif "recovery_s" in row:
            recovery = f"{row['recovery_s']} s to the first answer after the kill"
        elif "rollout_s" in row:
            recovery = f"{row['rollout_s']} s rollout; longest without an answer {row['longest_without_an_answer_s']} s"
        elif key == "soak":
            recovery = f"{row['seconds']:.0f} s; RSS +{row['rss_growth_mib']} MiB after warm-up"
        else:
            recovery = (f"503s within {row['shed_slowest_s']} s; replica RSS after each burst "
                        f"{row['replica_rss_mib_after_each_burst']} MiB")
        completed = row["completed"] + row.get("disconnected", 0)
        extra = f" ({row['disconnected']} left early)" if row.get("disconnected") else ""
        lines.append(f"| {name} | {row['sent']} | {completed}{extra} | {row['clean_error']} | {row['shed']} | "
                     f"{row['cut']} | {row['hung']} | {recovery} |")
    machine = figures["machine"]
    lines.append("")
    lines.append(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, no GPU; "
                 f"vLLM {machine['vllm']} (CPU build), Ray {machine['ray']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    if not FIGURES.exists():
        sys.exit(f"{FIGURES} does not exist: run `make test-faults` (and `make soak`) first")
    print(table(json.loads(FIGURES.read_text())))

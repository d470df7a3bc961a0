"""What an idle cluster costs: the cores each process keeps busy with no traffic at all (benchmarks/NOTES.md).

Run: ``.venv/bin/python -m benchmarks.idle [KEY=VALUE ...]`` with nothing else running. It starts
``serve run serve_config.yaml`` as ``make serve`` does (``KEY=VALUE`` pairs are added to its environment, to
try one of Ray's or Serve's settings), waits for the first multimodal answer and then ``IDLE_SETTLE_S`` (60 s:
start-up work, the first health checks and metric pushes), measures two ``IDLE_WINDOW_S`` windows (30 s),
prints the cores each role kept busy, and stops the cluster.
"""

import os
import sys
import time

from benchmarks import cpu
from benchmarks.run import CONFIG, DEFAULT_INGRESS, INGRESS_ENV, ROUTES, log, payloads, start, stop, wait_for_answer

SETTLE_S = float(os.environ.get("IDLE_SETTLE_S", "60"))
WINDOW_S = float(os.environ.get("IDLE_WINDOW_S", "30"))
WINDOWS = 2


def measure(extra_env: dict[str, str]) -> list[dict[str, float]]:
    """Cores by role in each window, with ``extra_env`` in the cluster's environment."""
    from benchmarks.run import BIN

    process = start(
        [str(BIN / "serve"), "run", str(CONFIG)], env={**INGRESS_ENV[DEFAULT_INGRESS], **extra_env}, log_name="idle"
    )
    try:
        request = payloads()["multimodal"]
        started = wait_for_answer("http://127.0.0.1:8000", ROUTES["multimodal"], request, process)
        log(f"first multimodal answer {started:.1f} s after serve run; settling {SETTLE_S:.0f} s")
        time.sleep(SETTLE_S)
        windows = []
        for _ in range(WINDOWS):
            with cpu.Meter() as meter:
                time.sleep(WINDOW_S)
            windows.append({role: cores for role, cores in meter.cores(WINDOW_S).items() if role != "load generator"})
        return windows
    finally:
        stop(process)


def main() -> None:
    extra = dict(pair.split("=", 1) for pair in sys.argv[1:])
    log(f"idle cluster, {CONFIG.name}, extra environment {extra or 'none'}")
    windows = measure(extra)
    roles = sorted({role for window in windows for role in window}, key=lambda r: -windows[0].get(r, 0.0))
    print("| process | " + " | ".join(f"window {i + 1}, cores" for i in range(len(windows))) + " |")
    print("|---|" + "---|" * len(windows))
    for role in roles:
        print(f"| {role} | " + " | ".join(f"{w.get(role, 0.0):.3f}" for w in windows) + " |")
    print("| **total** | " + " | ".join(f"**{sum(w.values()):.3f}**" for w in windows) + " |")


if __name__ == "__main__":
    main()

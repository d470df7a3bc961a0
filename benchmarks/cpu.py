"""CPU time per request by process, read from ``/proc`` around a load point, and each process's niceness.

Every process of this machine that the benchmark can read is sampled before and after a point; the CPU it
spent in between (user and system time) is divided by the requests answered. Processes are grouped by what
they are in the serving stack: each Serve deployment's replicas, the HTTP proxy, Ray's own processes, the
single-process baseline server and the load generator (this process and the load processes it started).
Linux only; elsewhere the breakdown is empty.
"""

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Sample:
    role: str
    cpu_s: float
    nice: int


def role(pid: int, cmdline: str) -> str | None:
    """What a process is in the serving stack (None for a process that has nothing to do with it)."""
    if pid == os.getpid() or (_parent(pid) == os.getpid() and "multiprocessing" in cmdline):
        return "load generator"
    if cmdline.startswith("ray::ServeReplica:"):  # ray::ServeReplica:<app>:<deployment>[.<method> while busy]
        return "replica: " + cmdline.split()[0].rsplit(":", 1)[-1].split(".")[0]
    if " -m piper " in f" {cmdline} ":  # the speech synthesiser's own program, a child of its replica
        return "replica: SpeechSynthesizer (its Piper program)"
    if cmdline.startswith("ray::ProxyActor"):
        return "HTTP proxy"
    if cmdline.split(" ", 1)[0].endswith("/haproxy"):  # the HAProxy ingress (make serve INGRESS=haproxy)
        return "HAProxy"
    if cmdline.startswith("ray::ServeController"):
        return "Serve controller"
    if "bin/serve run" in cmdline:
        return "serve run (Ray's driver; prints the workers' logs)"
    if "baseline_server" in cmdline:
        return "baseline server"
    if cmdline.startswith("ray::") or any(
        name in cmdline for name in ("raylet", "gcs_server", "/ray/dashboard/", "/ray/_private/", "ray/autoscaler")
    ):
        return "Ray system (raylet, GCS, dashboard, agents, idle workers)"
    return None


def _parent(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _read(pid: int) -> Sample | None:
    try:
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:  # gone, or not ours to read
        return None
    name = role(pid, cmdline)
    if name is None:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3 of stat(5)
    utime, stime, nice = int(fields[11]), int(fields[12]), int(fields[16])
    return Sample(name, (utime + stime) / TICKS_PER_S, nice)


def snapshot() -> dict[int, Sample]:
    """Every serving-stack process's CPU seconds so far, by pid."""
    if not PROC.is_dir():
        return {}
    samples = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (sample := _read(int(entry.name))):
            samples[int(entry.name)] = sample
    return samples


def per_request(before: dict[int, Sample], after: dict[int, Sample], requests: int) -> dict[str, dict]:
    """CPU milliseconds per answered request by role, with each role's process count and niceness.

    A process started during the point counts from zero; one that ended during it is missing (its last
    seconds are lost, which a point of several seconds makes rare).
    """
    by_role: dict[str, dict] = {}
    for pid, sample in after.items():
        spent = sample.cpu_s - (before[pid].cpu_s if pid in before else 0.0)
        entry = by_role.setdefault(sample.role, {"cpu_ms_per_request": 0.0, "processes": 0, "nice": set()})
        entry["cpu_ms_per_request"] += 1000.0 * spent / max(requests, 1)
        entry["processes"] += 1
        entry["nice"].add(sample.nice)
    return {
        name: {**entry, "nice": sorted(entry["nice"])}
        for name, entry in sorted(by_role.items(), key=lambda item: -item[1]["cpu_ms_per_request"])
    }


class Meter:
    """``with Meter() as meter: ...`` then ``meter.per_request(answered)``."""

    def __enter__(self) -> "Meter":
        self.before = snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.after = snapshot()

    def per_request(self, requests: int) -> dict[str, dict]:
        return per_request(self.before, self.after, requests)

    def cores(self, seconds: float) -> dict[str, float]:
        """Cores each role kept busy over ``seconds`` of wall time (its CPU seconds over them), busiest first."""
        spent = {name: entry["cpu_ms_per_request"] / 1000.0 for name, entry in self.per_request(1).items()}
        return {name: cpu_s / seconds for name, cpu_s in spent.items()} if seconds > 0 else {}

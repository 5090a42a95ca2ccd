"""Memory probes of ``fedshift bench`` and its plain-Flower baseline: a process's resident memory, the Ray
client workers' processes, and a sampler that follows both while a run goes (Linux /proc)."""

from __future__ import annotations

import threading
from pathlib import Path


def rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def worker_pids() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"ClientAppActor" in cmd or b"ray::" in cmd and b"Actor" in cmd:
                pids.append(int(p.name))
    return pids


class MemorySampler:
    """Samples the RSS of the client workers (summed; ``pids``: the Ray workers unless told) and of this process,
    every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5, pids=None):
        self.interval, self.workers_peak_mb, self.driver_peak_mb = interval, 0.0, 0.0
        self.pids = pids or worker_pids
        self.driver_series: list[float] = []
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        workers = sum(rss_mb(p) for p in self.pids())
        self.workers_peak_mb = max(self.workers_peak_mb, workers)
        drv = rss_mb()
        self.driver_series.append(drv)
        self.driver_peak_mb = max(self.driver_peak_mb, drv)

    def __enter__(self) -> MemorySampler:
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()
        self.sample()


def pss_mb(pid: int | str = "self") -> float:
    """Proportional set size (MB): the process's private memory plus its share of pages mapped by several
    processes, so that summing it over processes counts a shared copy once (Linux /proc/PID/smaps_rollup)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")

"""Timing that survives a shared machine: the clock of `noiserefine bench` and `demo`.

- A fixed torch thread count (`torch_threads`, default `DEFAULT_THREADS` = 1). With two or more
  threads per operation, a thread that the OS deschedules for another process stalls its partners
  at every operation's barrier, and small operations suffer more than large ones: a loaded
  machine then slows some rows more than others (a refined/CFG time ratio of 0.47 on a quiet
  machine read 1.15 beside other jobs). One thread is slowed in proportion to the CPU share it
  gets, the same for every row.
- Interleaved rounds (`chunk_bounds`, `schedule`): each row's images are split into R chunks and
  round k samples chunk k of every row, so load that hits the machine at some moment hits every
  row alike; a row's time is the sum over its chunks.
- Process CPU time beside wall time (`RowClock`): CPU time counts only the time the process ran,
  so load inflates it far less than wall time.
- How loaded the machine was (`MachineLoad`): the load average before and after the timed rounds
  against the number of CPUs; the bench's table warns when other work competed for the CPUs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from noiserefine.errors import NoiseRefineError

DEFAULT_THREADS = 1
DEFAULT_ROUNDS = 8  # measured: at 4 rounds two --n 200 runs, alone and beside a 2-thread hog, differed by 20% (docs/timing.md)
LOAD_MARGIN = 0.5  # runnable threads beyond the CPUs before a run counts as loaded (short jobs come and go)


def check_timing(threads: int, rounds: int) -> None:
    """Refuse fewer than one torch thread or one round."""
    if threads < 1 or rounds < 1:
        raise NoiseRefineError(f"the bench needs threads >= 1 and rounds >= 1, got threads={threads}, rounds={rounds}")


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch (intra-op) threads, then restore the previous count."""
    check_timing(threads, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chunk_bounds(n: int, batch_size: int, rounds: int) -> list[tuple[int, int]]:
    """[lo, hi) image ranges of one row's chunks, one per round (fewer when n < rounds).

    A row of at least `rounds` batches is split between batches, so every batch holds the same
    images as in one unchunked run and the images are bit for bit the same. A smaller row is
    split into `rounds` near-equal chunks, each sampled as one smaller batch: the latents then
    differ in float rounding only (about 1e-6; after 8-bit quantisation one pixel level in
    135,168 was measured to change).
    """
    batches = math.ceil(n / batch_size)
    if batches >= rounds:
        return [(batch_size * (batches * k // rounds), min(n, batch_size * (batches * (k + 1) // rounds)))
                for k in range(rounds)]
    parts = min(rounds, n)
    return [(n * k // parts, n * (k + 1) // parts) for k in range(parts)]


def schedule(chunks: Sequence[int]) -> list[tuple[int, int]]:
    """(round, row) pairs in the order to run them, given each row's number of chunks: round k
    runs chunk k of every row that has one, starting one row later each round (so no row always
    runs first, right after another row's work)."""
    rows = len(chunks)
    return [(k, (k + j) % rows) for k in range(max(chunks, default=0)) for j in range(rows)
            if k < chunks[(k + j) % rows]]


class PeakRSS:
    """Peak resident memory above the level at entry: the kernel's own high-water mark (VmHWM,
    reset at entry through /proc/self/clear_refs) where it can be reset, else sampled every 5 ms;
    CUDA's own peak counter on a GPU."""

    def __enter__(self) -> "PeakRSS":
        self.cuda = torch.cuda.is_available()
        self._thread: threading.Thread | None = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = _rss()
        if not _reset_high_water_mark():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = _high_water_mark()

    @property
    def extra_mb(self) -> float:
        return max(0, self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_high_water_mark() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def _sync() -> None:
    """Wait for queued GPU work, so the clock reads the work done, not the work launched."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class RowClock:
    """One row's wall and process CPU seconds summed over its chunks, and its peak memory growth
    in any chunk. Process CPU time counts every thread of the process (torch's included)."""

    wall: float = 0.0
    cpu: float = 0.0
    peak_mb: float = 0.0
    chunks: int = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        """Add the block's wall and CPU time (and its memory growth) to this row."""
        _sync()
        with PeakRSS() as mem:
            wall, cpu = time.perf_counter(), time.process_time()
            yield
            _sync()
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu
        self.peak_mb = max(self.peak_mb, mem.extra_mb)
        self.chunks += 1


@dataclass
class MachineLoad:
    """The load average (1, 5, 15 minutes) before and after the timed rounds, against the CPUs."""

    threads: int
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    before: tuple[float, ...] = field(default_factory=lambda: os.getloadavg())
    after: tuple[float, ...] | None = None
    seconds: float = 0.0
    _start: float = field(default_factory=time.perf_counter, repr=False)

    def finish(self) -> "MachineLoad":
        self.after, self.seconds = os.getloadavg(), time.perf_counter() - self._start
        return self

    @property
    def others(self) -> float:
        """Runnable threads of other processes: the 1-minute load average before the rounds, or
        after them less this process's own share (its threads, in the kernel's exponentially
        damped 1-minute average), whichever is larger."""
        own = self.threads * (1 - math.exp(-self.seconds / 60))
        return max(self.before[0], (self.after or self.before)[0] - own, 0.0)

    @property
    def loaded(self) -> bool:
        """Did other work compete with the bench's threads for the CPUs (by more than `LOAD_MARGIN`)?"""
        return self.others + self.threads > self.cpus + LOAD_MARGIN

    def to_record(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "threads": self.threads, "loadavg_before": [round(x, 2) for x in self.before],
                "loadavg_after": [round(x, 2) for x in self.after or ()], "timed_seconds": round(self.seconds, 1),
                "other_load": round(self.others, 2), "loaded": self.loaded}


def load_warning(load: dict[str, Any]) -> str:
    """A table line warning that the machine was loaded ("" when it was not)."""
    if not load.get("loaded"):
        return ""
    return (f"\n**Warning: the machine was loaded** (1-minute load average {load['loadavg_before'][0]:g} before "
            f"and {load['loadavg_after'][0]:g} after the timed rounds, about {load['other_load']:g} from other work, "
            f"on {load['cpus']} CPUs; the bench used {load['threads']} thread(s)): absolute times are inflated; "
            "the time ratios come from interleaved rounds, and CPU times are inflated less.\n")

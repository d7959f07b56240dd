"""Wall time and peak memory per phase of a run (generate, update, eval, ...).

On CUDA the peak is `torch.cuda.max_memory_allocated` since the phase began (tensors only, exact).
On CPU it is the largest resident set size (RSS) of this process, sampled every `interval_s` seconds by a
background thread while the phase runs, plus once at its start and end: a spike shorter than the interval
can be missed, so read that as a close lower bound. Where the phase raised the process's own high-water mark
(Linux keeps it: `VmHWM` in /proc/self/status), that mark is the phase's peak, exact however short the spike:
so it is for a phase that uses more memory than any before it, such as the update in each of the bench's
memory probes. With `processes=True` a sample adds the private memory (USS) of this process's children, such
as forked workers: what they share with this process (its model's weights, until written) is counted once.
Reading a child's USS walks its page tables (about 15 ms for a 2 GB process), so such a meter wants an
interval of a few hundred ms.
A phase entered several times accumulates its time and keeps its largest peak.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import psutil
import torch

MB = 1024 * 1024


def out_of_memory(err: BaseException) -> bool:
    """Whether `err` reports a failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's failure,
    which torch raises as a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def high_water() -> int | None:
    """This process's largest RSS so far in bytes, as Linux keeps it (`VmHWM`), or None where /proc does not
    say. Read, never reset: resetting it (/proc/self/clear_refs) would also lose the peak that getrusage and
    `/usr/bin/time -v` report for the whole process."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class PhaseMeter:
    def __init__(self, device: torch.device, interval_s: float = 0.01, processes: bool = False):
        self.device, self.interval_s, self.processes = device, interval_s, processes
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_mb: dict[str, float] = defaultdict(float)
        self._process = psutil.Process()

    @property
    def kind(self) -> str:
        """What `mem/*` figures mean, logged as `mem/device`."""
        if self.device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(self.device)} (peak allocated)"
        return "cpu (peak process RSS)"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield
            finally:
                torch.cuda.synchronize(self.device)
                peak = torch.cuda.max_memory_allocated(self.device)
                self._record(name, start, peak)
            return
        mark = high_water()
        peak = [self._resident()]
        stop = threading.Event()

        def sample() -> None:
            # The first samples come sooner, so that a phase shorter than the interval (forked workers that
            # train a tiny model) still gets one while it runs.
            delay = min(self.interval_s, 0.01)
            while not stop.wait(delay):
                peak[0] = max(peak[0], self._resident())
                delay = min(2 * delay, self.interval_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], self._resident())
            raised = high_water()
            if mark is not None and raised is not None and raised > mark:  # the process's peak came in it
                peak[0] = max(peak[0], raised)
            self._record(name, start, peak[0])

    def _resident(self) -> int:
        """Bytes: this process's RSS, plus its children's USS when the meter counts them."""
        total = self._process.memory_info().rss
        if self.processes:
            for child in self._process.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # it may end between listing and reading
                    total += child.memory_full_info().uss
        return total

    def _record(self, name: str, start: float, peak_bytes: int) -> None:
        self.seconds[name] += time.perf_counter() - start
        self.peak_mb[name] = max(self.peak_mb[name], peak_bytes / MB)

    def add(self, seconds: dict[str, float], peak_mb: dict[str, float]) -> None:
        """Phases measured elsewhere (a Ray worker, another meter): times add up, peaks take the max."""
        for name, value in seconds.items():
            self.seconds[name] += value
        for name, value in peak_mb.items():
            self.peak_mb[name] = max(self.peak_mb[name], value)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in self.seconds:
            out[f"time/{name}_s"] = round(self.seconds[name], 3)
            out[f"mem/peak_{name}_mb"] = round(self.peak_mb[name], 1)
        return out

"""Wall time and peak memory per phase of a run (generate, update, eval, ...).

On CUDA the peak is `torch.cuda.max_memory_allocated` since the phase began (tensors only, exact).
On CPU it is the largest resident set size (RSS) of this process. On Linux the kernel keeps that peak itself
(`VmHWM` in /proc/self/status, which writing 5 to /proc/self/clear_refs resets to the RSS of the moment), so
the peak is exact, however short the spike, and nothing runs beside the phase. Elsewhere, and with
`processes=True`, a background thread samples every `interval_s` seconds while the phase runs, plus once at
its start and end: a spike shorter than the interval can be missed, so read that as a close lower bound.
`processes=True` adds the private memory (USS) of this process's children, such as forked workers: what they
share with this process (its model's weights, until written) is counted once. Reading a child's USS walks its
page tables (about 15 ms for a 2 GB process), so such a meter wants an interval of a few hundred ms.
A phase entered several times accumulates its time and keeps its largest peak. Phases may nest, within a
meter or across meters: a phase's peak is the largest RSS from its start to its end.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import psutil
import torch

MB = 1024 * 1024


class KernelPeak:
    """This process's peak RSS as Linux keeps it. Resetting the mark would lose the peak of any phase open
    at the time, so each reset first folds the mark into the peaks of the open phases."""

    STATUS, CLEAR = "/proc/self/status", "/proc/self/clear_refs"

    def __init__(self) -> None:
        self._open: list[list[int]] = []  # the peak so far of each phase open now, in bytes
        self._lock = threading.Lock()
        self.available = self._works()

    def _works(self) -> bool:
        try:
            self._mark()
            with open(self.CLEAR, "w") as clear:
                clear.write("5")
        except (OSError, ValueError, AttributeError):  # not Linux, or /proc not readable or writable
            return False
        return True

    def _mark(self) -> int:
        with open(self.STATUS) as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def _fold(self) -> None:
        mark = self._mark()
        for peak in self._open:
            peak[0] = max(peak[0], mark)

    def enter(self) -> list[int]:
        with self._lock:
            self._fold()
            with open(self.CLEAR, "w") as clear:
                clear.write("5")
            peak = [self._mark()]
            self._open.append(peak)
            return peak

    def exit(self, peak: list[int]) -> int:
        with self._lock:
            self._fold()
            del self._open[next(i for i, open_peak in enumerate(self._open) if open_peak is peak)]
            return peak[0]


_KERNEL_PEAK: KernelPeak | None = None


def kernel_peak() -> KernelPeak:
    global _KERNEL_PEAK
    if _KERNEL_PEAK is None:
        _KERNEL_PEAK = KernelPeak()
    return _KERNEL_PEAK


def _forget_in_child() -> None:
    """A forked child has its own high-water mark and none of its parent's phases open (nor its lock held)."""
    global _KERNEL_PEAK
    _KERNEL_PEAK = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


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
        if not self.processes and kernel_peak().available:
            return "cpu (peak process RSS, Linux's high-water mark)"
        return f"cpu (peak process RSS, sampled every {self.interval_s:g} s)"

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
        if not self.processes and kernel_peak().available:
            mark = kernel_peak().enter()
            try:
                yield
            finally:
                self._record(name, start, kernel_peak().exit(mark))
            return
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
            self._record(name, start, max(peak[0], self._resident()))

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

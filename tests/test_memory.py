"""seal.memory.PhaseMeter: time and peak memory per phase."""

import mmap
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import seal.memory
from seal.memory import PhaseMeter, high_water

MiB = 1024 * 1024


def touch(mb: int) -> mmap.mmap:
    """Fresh anonymous pages, each written once: unlike a bytearray, they cannot be pages the allocator
    (TCMalloc, under `LD_PRELOAD`) kept resident from earlier tests, so the RSS must grow by `mb` MB."""
    block = mmap.mmap(-1, mb * MiB)
    for offset in range(0, mb * MiB, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_a_phase_shorter_than_the_interval_is_still_sampled_while_it_runs(monkeypatch):
    """The sampler alone (the kernel's high-water mark hidden): with a 10 s interval, a phase of about 1 s
    that holds 200 MB only in its middle still shows them: the first samples come sooner than the interval (a
    forked bench probe of the tiny model lasts about 0.2 s). The block is held 0.7 s, longer than the gap
    between samples until 1.27 s into the phase (640 ms), so a busy machine that slows the writing of its
    pages cannot put them all between two samples; the interval is far longer than the phase so that it
    cannot make the phase outlast it either (CI once took 1.13 s for a phase of 0.3 s)."""
    monkeypatch.setattr(seal.memory, "high_water", lambda: None)
    meter = PhaseMeter(torch.device("cpu"), interval_s=10.0)
    with meter.phase("idle"):
        pass
    with meter.phase("short"):
        time.sleep(0.05)
        block = touch(200)
        time.sleep(0.7)
        block.close()
        time.sleep(0.05)
    assert meter.peak_mb["short"] > meter.peak_mb["idle"] + 150
    assert 0.3 <= meter.seconds["short"] < meter.interval_s


def spike_below_the_sampler() -> None:
    """200 MB written and unmapped at once, while the sampler sees only the RSS at the phase's start (its
    reading replaced by a constant): the phase's peak shows them all the same, from the kernel's own mark. A
    later phase that stays below the mark keeps its sampled peak, not the earlier spike's."""
    meter = PhaseMeter(torch.device("cpu"), interval_s=10.0)
    with meter.phase("idle"):
        pass
    start = meter._process.memory_info().rss
    meter._resident = lambda: start  # the sampler sees nothing of the spike
    with meter.phase("spike"):
        touch(200).close()
    assert meter.peak_mb["spike"] > meter.peak_mb["idle"] + 150, dict(meter.peak_mb)
    with meter.phase("after"):
        pass
    assert meter.peak_mb["after"] < meter.peak_mb["spike"] - 150, dict(meter.peak_mb)


@pytest.mark.skipif(high_water() is None, reason="Linux's VmHWM is not available here")
def test_a_spike_that_raises_the_processs_high_water_mark_is_the_phases_peak_however_short():
    """`spike_below_the_sampler` in a forked worker, whose high-water mark starts at its own RSS (this test
    process's, after tests that load models, may be gigabytes); its assertion errors are raised here."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(spike_below_the_sampler).result()

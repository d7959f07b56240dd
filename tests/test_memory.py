"""seal.memory.PhaseMeter: time and peak memory per phase."""

import time

import torch

from seal.memory import PhaseMeter


def test_a_phase_shorter_than_the_interval_is_still_sampled_while_it_runs():
    """With a 1 s interval, a 0.3 s phase that holds 200 MB only in its middle still shows them: the first
    samples come sooner than the interval (a forked bench probe of the tiny model lasts about 0.2 s)."""
    meter = PhaseMeter(torch.device("cpu"), interval_s=1.0)
    with meter.phase("idle"):
        pass
    with meter.phase("short"):
        time.sleep(0.05)
        block = bytearray(200 * 1024 * 1024)  # zero-filled, so every page is touched
        time.sleep(0.2)
        del block
        time.sleep(0.05)
    assert meter.peak_mb["short"] > meter.peak_mb["idle"] + 150
    assert 0.3 <= meter.seconds["short"] < 1.0

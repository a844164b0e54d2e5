"""The training log's interval time: validation and checkpoint saving are not training (a driven clock)."""

import pytest

from pyramidion_ds.train.trainer import Meters


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_paused_time_is_left_out_of_the_interval_and_reset_keeps_the_clock():
    clock = Clock()
    meters = Meters(clock=clock)
    clock.now += 2.0  # training
    with meters.paused():  # validation + save
        clock.now += 30.0
    clock.now += 1.0  # training
    assert meters.elapsed() == pytest.approx(3.0) and meters.paused_s == pytest.approx(30.0)
    meters.reset()
    clock.now += 4.0
    assert meters.elapsed() == pytest.approx(4.0) and meters.paused_s == 0.0


def test_time_paused_by_a_failure_still_counts_as_paused():
    clock = Clock()
    meters = Meters(clock=clock)
    with pytest.raises(OSError), meters.paused():
        clock.now += 5.0
        raise OSError("disk full")
    clock.now += 1.0
    assert meters.elapsed() == pytest.approx(1.0)

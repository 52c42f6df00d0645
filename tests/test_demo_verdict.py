"""The demo's verdict: a paired rule over the alternated repetitions, on synthetic timing lists."""

from __future__ import annotations

import math

import pytest

from overlap.demo import _verdict, median_interval, paired_speedups


def test_a_median_twice_as_slow_is_never_within_noise():
    # The reported case: medians 48.5 ms vs 102.2 ms, with one noisy pair making the ranges overlap
    # (the old "ranges overlap -> within noise" rule called it noise).
    serial = [48.5, 47.0, 50.0, 120.0, 49.0]
    overlapped = [102.2, 100.0, 98.0, 45.0, 105.0]
    assert _verdict(serial, overlapped) == "likely slower"
    assert _verdict(serial[:3], overlapped[:3]) == "slower"  # every pair slower
    assert _verdict(overlapped, serial) == "likely faster"


@pytest.mark.parametrize("factor,verdict", [(2.0, "slower"), (0.5, "faster"), (1.02, "slower"), (0.98, "faster")])
def test_every_pair_one_way_decides_even_a_small_difference(factor, verdict):
    serial = [10.0, 30.0, 12.0, 50.0, 11.0, 9.0]  # the load varies a lot between pairs
    assert _verdict(serial, [s * factor for s in serial]) == verdict


def test_mixed_pairs_near_one_are_within_noise_and_far_from_one_are_not():
    serial = [10.0] * 6
    assert _verdict(serial, [9.5, 10.4, 9.8, 10.3, 10.1, 9.7]) == "within noise"
    assert _verdict(serial, [25.0, 24.0, 9.0, 26.0, 23.0, 8.0]) == "likely slower"
    assert _verdict([10.0], [30.0]) == "1 rep: no spread"


def test_the_median_interval_is_the_order_statistic_interval():
    assert paired_speedups([2.0, 3.0], [1.0, 6.0]) == [2.0, 0.5]
    assert paired_speedups([1.0], [0.0]) == [math.inf]
    with pytest.raises(ValueError, match="overlapped must have one time per serial time"):
        paired_speedups([1.0, 2.0], [1.0])
    low, high, cover = median_interval([5.0, 1.0, 3.0])
    assert (low, high, cover) == (1.0, 5.0, 0.75)  # below 5 values: [min, max], 1 - 2/8
    values = list(range(20))
    low, high, cover = median_interval(values)
    # n = 20: P(Bin(20, 1/2) <= 5) = 0.0207, P(<= 6) = 0.0577 -> k = 6, coverage 1 - 2 * 0.0207
    assert (low, high) == (5, 14) and cover == pytest.approx(1 - 2 * 21700 / 2**20)
    assert cover >= 0.9
    with pytest.raises(ValueError, match="values must not be empty"):
        median_interval([])

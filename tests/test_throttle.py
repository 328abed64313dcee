from __future__ import annotations

import pytest

from floodd.service.throttle import Throttle


def test_each_key_is_allowed_once_per_interval() -> None:
    throttle: Throttle[str] = Throttle(10)
    assert throttle.allow(100.0, "a", 60.0)
    assert not throttle.allow(100.0, "a", 60.0)
    assert not throttle.allow(159.9, "a", 60.0)
    assert throttle.allow(100.0, "b", 10.0)
    assert throttle.allow(160.0, "a", 60.0)
    assert not throttle.allow(200.0, "a", 60.0)
    assert throttle.allow(220.0, "a", 60.0)


def test_keys_whose_interval_is_over_are_forgotten() -> None:
    throttle: Throttle[int] = Throttle(1000)
    for i in range(100):
        assert throttle.allow(float(i), i, 10.0)
    assert len(throttle) == 10  # only the keys allowed in the last 10 s are remembered


def test_a_flood_of_keys_is_bounded_forgetting_the_oldest() -> None:
    throttle: Throttle[int] = Throttle(100)
    for i in range(100_000):
        assert throttle.allow(0.0, i, 3600.0)
    assert len(throttle) == 100
    assert not throttle.allow(1.0, 99_999, 3600.0)  # the latest are remembered
    assert throttle.allow(1.0, 0, 3600.0)  # the oldest was forgotten: allowed again


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Throttle[int](0)

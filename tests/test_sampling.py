"""floodd.detect.sampling: the 1-in-n rate from how busy the capture was and the kernel's
drops, on plain data (the clock passed in)."""

from __future__ import annotations

import pytest

from floodd.detect.sampling import CALM, HIGH, LOW, SETTLE, SamplingControl
from floodd.errors import FlooddError


def test_doubles_when_busy_and_waits_between_changes() -> None:
    control = SamplingControl(8)
    assert control.update(0.0, 0.5, 0, 1000) == 1
    assert control.update(0.1, HIGH + 0.01, 0, 2000) == 2
    # Within SETTLE the old rate's packets are still being counted: no change.
    assert control.update(0.1 + SETTLE / 2, 1.0, 0, 3000) == 2
    assert control.update(0.1 + SETTLE, 1.0, 0, 4000) == 4
    assert control.update(0.2 + 2 * SETTLE, 1.0, 0, 5000) == 8
    assert control.update(0.3 + 3 * SETTLE, 1.0, 0, 6000) == 8  # the limit


def test_kernel_drops_double() -> None:
    control = SamplingControl(64)
    assert control.update(0.0, 0.3, 0, 1000) == 1
    assert control.update(1.0, 0.3, 5, 2000) == 2  # dropped while not that busy
    assert control.update(2.0, 0.3, 5, 3000) == 2  # no new drops
    # Drops during SETTLE are the old rate's; they are not counted again after it.
    assert control.update(2.1, 0.3, 9, 3100) == 4
    assert control.update(2.2, 0.3, 20, 3200) == 4
    assert control.update(3.0, 0.3, 20, 4000) == 4


def test_drops_before_the_first_update_count() -> None:
    assert SamplingControl(4).update(0.0, 0.1, 3, 100) == 2


def test_a_new_capture_restarts_the_counts() -> None:
    control = SamplingControl(8)
    assert control.update(0.0, 0.3, 100, 10_000) == 2
    assert control.update(1.0, 0.3, 0, 50) == 2  # reopened: smaller counters, no drops
    assert control.update(2.0, 0.3, 1, 100) == 4


def test_halves_after_a_calm_period() -> None:
    control = SamplingControl(16)
    t = 0.0
    for _ in range(4):
        t += SETTLE
        control.update(t, 0.9, 0, 0)
    assert control.n == 16
    t += 1.0
    assert control.update(t, LOW - 0.01, 0, 0) == 16  # calm starts
    assert control.update(t + CALM / 2, 0.1, 0, 0) == 16
    assert control.update(t + CALM / 2 + 0.1, LOW, 0, 0) == 16  # not calm: starts over
    t += CALM / 2 + 0.2
    assert control.update(t, 0.1, 0, 0) == 16
    t += CALM + 0.01
    assert control.update(t, 0.1, 0, 0) == 8
    assert control.update(t + 1.0, 0.1, 0, 0) == 8  # one step per calm period
    t += CALM + 0.01
    assert control.update(t, 0.1, 0, 0) == 4
    # Between the marks nothing moves.
    for i in range(20):
        assert control.update(t + 3 * CALM + i, (LOW + HIGH) / 2, 0, 0) == 4


def test_halving_cannot_swing_back() -> None:
    """Halving under LOW at most doubles the work: still under HIGH."""
    assert 2 * LOW < HIGH


def test_never_under_one() -> None:
    control = SamplingControl(4)
    for i in range(10):
        assert control.update(float(i * CALM), 0.0, 0, 0) == 1


def test_limit_one_never_samples() -> None:
    control = SamplingControl(1)
    assert control.update(0.0, 1.0, 10, 100) == 1
    assert control.update(1.0, 1.0, 20, 200) == 1


@pytest.mark.parametrize("value", [0, 3, 48, -2, True, 2.0, "8"])
def test_bad_limit(value: object) -> None:
    with pytest.raises(FlooddError, match=r"^capture sampling limit .*: expected a power of "
                       r"two, 1 or more$"):
        SamplingControl(value)  # type: ignore[arg-type]

"""The benchmarks' memory measurements (`analysis/toolkit.py`) against allocations whose sizes
are known."""

import torch

MiB = 2**20
FLOATS = MiB // 4  # float32 elements in one MiB


def test_tensor_peak_is_the_most_bytes_alive_together():
    from analysis import toolkit

    def calls():
        a = torch.empty(FLOATS)  # 1 MiB
        b = torch.empty(2 * FLOATS)  # 3 MiB together
        del a  # 2
        c = torch.empty(3 * FLOATS)  # 5 MiB together: the peak
        del b, c
        return torch.empty(4 * FLOATS)  # 4 MiB alone

    assert abs(toolkit.tensor_peak(calls) - 5.0) < 0.01


def test_tensor_peak_counts_from_the_start_of_the_call():
    """A tensor alive before the call and freed during it does not lower the count."""
    from analysis import toolkit

    held = [torch.empty(4 * FLOATS)]

    def calls():
        held.clear()
        return torch.empty(2 * FLOATS)

    assert abs(toolkit.tensor_peak(calls) - 2.0) < 0.01


def test_bracketed_ratio_follows_a_drifting_machine(monkeypatch):
    """On a clock where the machine slows down 20 % per call, a method that costs 5 units at
    any moment is measured at 5 units within the drift of one bracket (three unit calls); a
    best-of of each side taken apart (the unit first, then the method k calls later) would read
    5 × 1.2^k."""
    from analysis import toolkit

    clock = {"now": 0.0, "speed": 1.0}

    def advance(units: float) -> None:
        clock["now"] += units * clock["speed"]
        clock["speed"] *= 1.2  # the machine slows down between any two calls

    monkeypatch.setattr(toolkit.time, "perf_counter", lambda: clock["now"])
    out = toolkit.bracketed_ratio(lambda: advance(5.0), lambda: advance(1.0), rounds=3)
    assert len(out["ratios"]) == 3
    # each call's unit is the first of the 3 units timed right before it: 3 calls earlier
    bound = 5.0 * 1.2**3 * (1 + 1e-9)
    assert all(5.0 <= r <= bound for r in out["ratios"])
    assert 5.0 <= out["ratio"] <= bound
    # while the unit drifted by far more than that over the run: the median round's unit is
    # more than 1.2^5 = 2.5 times the first call's
    assert out["unit_seconds"] > 1.2**5

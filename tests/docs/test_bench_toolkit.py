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

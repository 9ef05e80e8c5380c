"""Checks on which calls a computation took: a counting wrapper (which rule or kernel ran), and
the second-order-only contract of the rules written for graphs differentiated twice."""

import pytest
import torch


def spy(calls: list, function):
    """`function`, appending 1 to `calls` at each call."""

    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted


def assert_twice_only(value, leaf) -> None:
    """A graph built under `second_order_reverse()` gives `value`'s second derivative in `leaf`
    and raises, saying why, when a graph for the third is asked for (never a silent zero)."""
    (first,) = torch.autograd.grad(value, leaf, create_graph=True)
    torch.autograd.grad(first.sum(), leaf, retain_graph=True)  # the second: fine
    with pytest.raises(RuntimeError, match="differentiable twice, not three times"):
        torch.autograd.grad(first.sum(), leaf, create_graph=True)

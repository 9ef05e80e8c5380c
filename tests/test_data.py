"""Summaries over a data loader (hos._data) on one process.

Oracle: the same summary of the full-data loss (one batch holding every sample)
computed by :mod:`hos.reference` (nested jacfwd), in float64. A mean-reduced loss
over N samples split into uneven batches must give the same numbers when each
batch is weighted by its size (DESIGN.md §1).
"""

import functools
import io
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hos
from tests.helpers.tolerances import EXACT, FLOAT32_LOADER, SAME_OPS

#: float64 agreement of a loader summary with the full-data oracle (the brief's 1e-10).
TOL = EXACT["rtol"]
N, D_IN, HIDDEN, CLASSES = 23, 4, 5, 3


def make_problem(dtype=torch.float64, seed=0):
    """A tanh MLP, N samples, a direction and a per-tensor partition (S = 4), seeded."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    model = model.to(torch.float64)
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=gen)
    u = {
        k: torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for k, p in model.named_parameters()
    }
    model = model.to(dtype)
    u = {k: v.to(dtype) for k, v in u.items()}
    return model, x.to(dtype), y, u, hos.Partition.per_tensor(model)


def full_data(model, criterion, x, y, u, part, kind, order=None):
    """The oracle: hos.reference on the loss of all samples at once."""
    loss = hos.model_loss(model, criterion, x, y)
    params = dict(model.named_parameters())
    if kind == "summarize":
        ref = functools.partial(hos.summary_tensor, loss, params, u, part, backend="reference")
        d3 = hos.summary_diagonal(loss, params, u, part, 3, backend="reference")
        value = loss({k: p.detach() for k, p in params.items()}).detach()
        return hos.Summary(g=ref(1), H=ref(2), d3=d3, names=part.names, loss=value)
    fn = hos.summary_tensor if kind == "tensor" else hos.summary_diagonal
    return fn(loss, params, u, part, order, backend="reference")


@functools.cache
def oracle(kind, order=None, reduction="mean"):
    """:func:`full_data` on the float64 problem of :func:`make_problem`, computed once."""
    model, x, y, u, part = make_problem()
    return full_data(model, nn.CrossEntropyLoss(reduction=reduction), x, y, u, part, kind, order)


def max_err(a, b):
    return float((a.double() - b.double()).abs().max() / max(1.0, float(b.abs().max())))


def assert_close(got, want, what, tol=TOL):
    err = max_err(got, want)
    assert err <= tol, f"{what}: max relative error {err:.3g} > {tol:g}\ngot  {got}\nwant {want}"


def loader_of(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------- equality
@pytest.mark.parametrize("batch_size", [5, N])  # 5, 5, 5, 5, 3 and one full batch
def test_summarize_loader_equals_full_data(batch_size):
    model, x, y, u, part = make_problem()
    crit = nn.CrossEntropyLoss()
    s = hos.summarize_loader(model, crit, loader_of(x, y, batch_size), u, part, progress=False)
    want = oracle("summarize")
    assert s.names == part.names
    for name in ("g", "H", "d3", "loss"):
        got = getattr(s, name)
        assert got.dtype == torch.float64
        assert_close(got, getattr(want, name), f"{name} (batch {batch_size})")


def test_uneven_last_batch_needs_the_weights():
    """The unweighted mean of the batch summaries is wrong; the weighted one is right."""
    model, x, y, u, part = make_problem()
    crit = nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, N, 5)]
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    unweighted = sum(
        hos.summarize(hos.model_loss(model, crit, *b), params, u, part).H for b in batches
    )
    unweighted = unweighted / len(batches)
    want = oracle("summarize").H
    assert max_err(unweighted, want) > 1e3 * TOL  # the test below can fail
    got = hos.summarize_loader(model, crit, batches, u, part, progress=False).H
    assert_close(got, want, "H over a list of uneven batches")


@pytest.mark.parametrize(("order", "kind"), [(3, "tensor"), (2, "tensor"), (4, "diagonal")])
def test_tensor_and_diagonal_loaders_equal_full_data(order, kind):
    model, x, y, u, part = make_problem()
    crit = nn.CrossEntropyLoss()
    fn = hos.summary_tensor_loader if kind == "tensor" else hos.summary_diagonal_loader
    got = fn(model, crit, loader_of(x, y, 6), u, part, order, progress=False)
    want = oracle(kind, order)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert_close(got, want, f"{kind} order {order}")


def test_sum_reduction_weights_one():
    model, x, y, u, part = make_problem()
    crit = nn.CrossEntropyLoss(reduction="sum")
    got = hos.summary_tensor_loader(model, crit, loader_of(x, y, 5), u, part, 2, progress=False)
    want = oracle("tensor", 2, "sum")
    assert_close(got, want, "H of the summed loss")

    # A plain function with a sum over samples: say so explicitly.
    def summed(out, t):
        return nn.functional.cross_entropy(out, t, reduction="sum")

    got = hos.summary_tensor_loader(
        model, summed, loader_of(x, y, 5), u, part, 2, reduction="sum", progress=False
    )
    assert_close(got, want, "H of a summed plain-function criterion")


# --------------------------------------------------------------------------- precision
def test_float32_model_accumulates_in_float64():
    """Each batch's float32 summary is cast to float64 before the weighted sum."""
    model, x, y, u, part = make_problem(torch.float32)
    crit = nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, N, 4)]  # 4, .., 4, 3
    got = hos.summarize_loader(model, crit, batches, u, part, progress=False)
    assert got.g.dtype == got.H.dtype == got.d3.dtype == got.loss.dtype == torch.float64
    parts = [hos.summarize(hos.model_loss(model, crit, *b), params, u, part) for b in batches]
    assert all(p.H.dtype == torch.float32 for p in parts)
    sizes = [len(b[1]) for b in batches]
    by_hand = sum(n * p.H.double() for n, p in zip(sizes, parts)) / sum(sizes)
    assert_close(got.H, by_hand, "float32 batches accumulated in float64", tol=SAME_OPS)
    # and, to float32 accuracy, the float64 full-data answer
    want = oracle("summarize")
    assert_close(got.H, want.H, "float32 model vs float64 oracle", tol=FLOAT32_LOADER)


def test_bfloat16_model_returns_float64():
    model, x, y, u, part = make_problem(torch.bfloat16)
    got = hos.summary_diagonal_loader(
        model, nn.CrossEntropyLoss(), loader_of(x, y, 8), u, part, 3, progress=False
    )
    assert got.dtype == torch.float64 and bool(torch.isfinite(got).all())


# --------------------------------------------------------------------------- progress
def _run(progress, model_problem):
    model, x, y, u, part = model_problem
    return hos.summary_diagonal_loader(
        model, nn.CrossEntropyLoss(), loader_of(x, y, 8), u, part, 1, progress=progress
    )


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_when_stderr_is_not_a_terminal(monkeypatch):
    problem = make_problem()
    for stream, shown in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        _run(None, problem)
        assert ("summary_diagonal_loader" in stream.getvalue()) is shown, stream.getvalue()


@pytest.mark.parametrize("progress", [True, False])
def test_progress_forced(monkeypatch, progress):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    _run(progress, make_problem())
    assert ("3/3" in stream.getvalue()) is progress, stream.getvalue()


# --------------------------------------------------------------------------- interrupts
class _Interrupting:
    """Yields ``good`` batches, then raises KeyboardInterrupt (Ctrl-C inside the loop)."""

    def __init__(self, batches, good):
        self.batches, self.good = batches, good

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if i == self.good:
                raise KeyboardInterrupt
            yield b


def test_keyboard_interrupt_leaves_model_untouched():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 2)
    )
    model = model.double().train()
    x, y = torch.randn(12, D_IN, dtype=torch.float64), torch.randint(0, 2, (12,))
    u = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    part = hos.Partition.per_layer(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    with pytest.raises(KeyboardInterrupt):
        hos.summarize_loader(
            model, nn.CrossEntropyLoss(), _Interrupting(batches, 2), u, part, progress=False
        )
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed"
    assert all(p.grad is None for p in model.parameters())
    # nothing stale is kept: the next call equals a fresh one on the same batches
    a = hos.summarize_loader(model, nn.CrossEntropyLoss(), batches, u, part, progress=False)
    b = hos.summarize_loader(model, nn.CrossEntropyLoss(), list(batches), u, part, progress=False)
    assert torch.equal(a.H, b.H)


# --------------------------------------------------------------------------- errors
def _bad_calls():
    model, x, y, u, part = make_problem()
    crit = nn.CrossEntropyLoss()
    good = [(x[:4], y[:4])]
    return [
        ("not pairs", dict(loader=[x[:4]]), TypeError, r"\(inputs, targets\) pairs"),
        ("empty", dict(loader=[]), ValueError, r"no samples"),
        ("not iterable", dict(loader=3), TypeError, r"loader must be an iterable"),
        (
            "reduction none",
            dict(criterion=nn.CrossEntropyLoss(reduction="none")),
            ValueError,
            r"reduction='none'",
        ),
        ("mismatch", dict(reduction="sum"), ValueError, r"reduction='sum' but the criterion"),
        ("bad reduction", dict(reduction="max"), ValueError, r"reduction must be one of"),
        ("progress", dict(progress="yes"), TypeError, r"progress must be None"),
        ("model", dict(model=lambda p: p), TypeError, r"model must be an nn.Module"),
        (
            "partition",
            dict(partition=["0.weight"]),
            TypeError,
            r"partition must be a hos.Partition",
        ),
        (
            "direction",
            dict(direction={"0.weight": u["0.weight"]}),
            ValueError,
            r"direction keys differ",
        ),
    ], dict(model=model, criterion=crit, loader=good, direction=u, partition=part)


@pytest.mark.parametrize("index", range(10))
def test_errors_name_the_argument(index):
    table, base = _bad_calls()
    _, change, exc, pattern = table[index]
    args = {**base, "progress": False, **change}
    with pytest.raises(exc, match=pattern):
        hos.summarize_loader(
            args["model"],
            args["criterion"],
            args["loader"],
            args["direction"],
            args["partition"],
            reduction=args.get("reduction"),
            progress=args["progress"],
        )

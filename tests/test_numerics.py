"""Numerics and state: non-finite values, low precision, extreme scales, memory
estimates, and summaries that only read (also when interrupted).

The decisions tested here are documented in :mod:`hos._validate` and :mod:`hos._guards`.
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
from torch import nn

import hos
from hos import reference
from hos._refusals import RandomLossError
from tests.helpers.tolerances import EXACT, EXACT_AT_ANY_SCALE, FLOAT32

F64 = torch.float64
BACKENDS = ("reverse", "forward", "reference")


def _quartic(p):
    return (p["w"] ** 4).sum() / 4 + (p["w"].sum() * p["b"].sum()) ** 2 + p["b"].exp().sum()


def _point(dtype=F64, scale=1.0):
    g = torch.Generator().manual_seed(1)
    params = {
        "w": torch.randn(3, generator=g).to(dtype),
        "b": torch.randn(2, generator=g).to(dtype),
    }
    u = {k: (scale * torch.randn(v.shape, generator=g)).to(dtype) for k, v in params.items()}
    return params, u, hos.Partition.per_tensor(params)


def _messages(record) -> str:
    return " | ".join(
        str(w.message) for w in record if issubclass(w.category, hos.NonFiniteWarning)
    )


# ----------------------------------------------------------------------- non-finite results
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_loss_warns_and_returns_nan(backend):
    params, u, part = _point()

    def loss(p):  # sqrt of a negative number: NaN at θ, though θ and u are finite
        return torch.sqrt(-(p["w"] ** 2).sum()) + (p["b"] ** 2).sum()

    with pytest.warns(hos.NonFiniteWarning, match=r"summarize: loss is nan; g has .*groups \['w'"):
        s = hos.summarize(loss, params, u, part, backend=backend)
    assert torch.isnan(s.loss) and torch.isnan(s.g[0])
    if backend != "reference":  # forward mode propagates 0·NaN into every group
        assert torch.isfinite(s.g[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_in_float32_warns_before_and_after(backend):
    params, u, part = _point(torch.float32, scale=1e25)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        D = hos.summary_tensor(_quartic, params, u, part, 2, backend=backend)
    text = _messages(record)
    assert "outside the range of torch.float32" in text and "'w'" in text
    assert "NaN/Inf entries" in text and not torch.isfinite(D).all()


def test_underflow_in_float32_warns_and_float64_is_exact():
    """u ~ 1e-30: order-3 entries ~1e-90 vanish in float32 (warned) but not in float64."""
    params, u, part = _point(F64)
    c = 1e-30
    small = {k: c * v for k, v in u.items()}
    with pytest.warns(hos.NonFiniteWarning, match=r"outside the range of torch\.float32"):
        hos.summary_diagonal(
            _quartic,
            {k: v.float() for k, v in params.items()},
            {k: v.float() for k, v in small.items()},
            part,
            3,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", hos.NonFiniteWarning)
        tiny = hos.summary_diagonal(_quartic, params, small, part, 3)
    unit = reference.summary_diagonal(_quartic, params, u, part, 3)
    torch.testing.assert_close(tiny, c**3 * unit, **EXACT_AT_ANY_SCALE)


def test_finite_summary_does_not_warn():
    params, u, part = _point()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hos.NonFiniteWarning)
        hos.summarize(_quartic, params, u, part)
        hos.summary_tensor(_quartic, params, u, part, 4)


# ----------------------------------------------------------------------- low precision
def _bf16_case(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    x = torch.randn(8, 4).to(dtype)
    y = torch.arange(8) % 3
    return net, x, y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_summarised_in_float32(dtype):
    """The summary of a half-precision model is the float32 summary at its (rounded) point."""
    net, x, y = _bf16_case(dtype)
    params = dict(net.named_parameters())
    u = {k: torch.ones_like(v) for k, v in params.items()}
    part = hos.Partition.per_layer(net)
    s = hos.summarize(hos.model_loss(net, nn.CrossEntropyLoss(), x, y), params, u, part)
    assert s.H.dtype == torch.float32 and s.g.dtype == torch.float32
    twin = copy.deepcopy(net).double()
    p64 = {k: v.detach().double() for k, v in params.items()}
    u64 = {k: v.double() for k, v in u.items()}
    loss64 = hos.model_loss(twin, nn.CrossEntropyLoss(), x.double(), y)
    for k, expected in zip((1, 2), (s.g, s.H)):
        oracle = reference.summary_tensor(loss64, p64, u64, part, k)
        torch.testing.assert_close(expected.double(), oracle, **FLOAT32)
    assert all(p.dtype == dtype for p in net.parameters())  # the model is not converted


def test_half_precision_custom_loss_that_cannot_upcast_explains():
    a = torch.ones(3, dtype=torch.bfloat16)
    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    u = {"w": torch.ones(3, dtype=torch.bfloat16)}
    with pytest.raises(
        TypeError, match=r"params are torch\.bfloat16; hos computes summaries in torch\.float32"
    ):
        hos.summarize(
            lambda p: (torch.mv(a.reshape(1, 3), p["w"])).sum() ** 2,
            params,
            u,
            hos.Partition.whole(params),
        )


def test_mixed_precision_params_use_the_widest_dtype():
    params = {"w": torch.ones(2, dtype=torch.bfloat16), "v": torch.ones(2, dtype=F64)}
    u = {k: torch.ones_like(v) for k, v in params.items()}
    H = hos.summary_tensor(
        lambda p: (p["w"] * p["v"]).sum() ** 2, params, u, hos.Partition.per_tensor(params), 2
    )
    # φ(η) = (2(1+η_w)(1+η_v))² → H = [[8, 16], [16, 8]] at 0.
    assert H.dtype == F64
    torch.testing.assert_close(H, torch.tensor([[8.0, 16.0], [16.0, 8.0]], dtype=F64))


# ----------------------------------------------------------------------- memory
def test_memory_estimate_is_the_output_size():
    S, order = 200, 5
    params = {f"p{i}": torch.zeros(1) for i in range(S)}
    u = {k: torch.ones_like(v) for k, v in params.items()}
    with pytest.raises(hos.SummaryMemoryError) as info:
        hos.summary_tensor(
            lambda p: sum(v.sum() for v in p.values()),
            params,
            u,
            hos.Partition.per_tensor(params),
            order,
        )
    assert isinstance(info.value, MemoryError)
    need_tib = S**order * 4 / 2**40  # float32 entries
    assert f"{need_tib:.3g} TiB" in str(info.value)


# ----------------------------------------------------------------------- state
def _stateful_model():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)
    ).double()
    net.train()
    x = torch.randn(6, 4, dtype=F64)
    y = torch.arange(6) % 3
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.25)
    net[4].bias.grad = None
    return net, x, y


def _snapshot(net):
    return {
        "params": {k: v.detach().clone() for k, v in net.named_parameters()},
        "buffers": {k: v.clone() for k, v in net.named_buffers()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in net.named_parameters()},
        "modes": [m.training for m in net.modules()],
        "rng": torch.get_rng_state(),
        "grad_enabled": torch.is_grad_enabled(),
        "modes_stack": torch._C._len_torch_function_stack(),
    }


def _assert_same(before, after):
    for key in ("params", "buffers", "grads"):
        assert before[key].keys() == after[key].keys()
        for name, value in before[key].items():
            other = after[key][name]
            assert (value is None) == (other is None), (key, name)
            if value is not None:
                assert torch.equal(value, other), (key, name)
    for key in ("modes", "grad_enabled", "modes_stack"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"]), "the caller's RNG state changed"


class _Counting:
    """A loss that can interrupt its k-th call. (A loss that draws random numbers is
    refused: test_a_loss_that_draws_is_refused_and_the_rng_is_untouched.)"""

    def __init__(self, loss, backend, interrupt_at=None):
        self.loss, self.calls, self.interrupt_at = loss, 0, interrupt_at

    def __call__(self, p):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.loss(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_that_draws_is_refused_and_the_rng_is_untouched(backend):
    net, x, y = _stateful_model()
    params = dict(net.named_parameters())
    base = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
    before = _snapshot(net)
    with pytest.raises(RandomLossError, match="samples random numbers"):
        hos.summarize(lambda p: base(p) + 0.0 * torch.rand(()), params, params,
                      hos.Partition.per_layer(net), backend=backend)  # fmt: skip
    _assert_same(before, _snapshot(net))


class _Tripwire(torch.autograd.Function):
    """Identity whose k-th backward (at any order) raises KeyboardInterrupt."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.calls += 1
        if ctx.counter.calls == ctx.counter.interrupt_at:
            raise KeyboardInterrupt
        return _Tripwire.apply(grad, ctx.counter), None


#: Every kind of summary with the fast backends; the slow oracle with one kind.
KIND_BACKEND = [
    (kind, backend)
    for kind in ("summarize", "tensor", "diagonal")
    for backend in BACKENDS
    if backend != "reference" or kind == "tensor"
]


def _run(kind, loss, params, u, part, backend):
    if kind == "summarize":
        s = hos.summarize(loss, params, u, part, backend=backend)
        return torch.cat([s.g, s.H.flatten(), s.d3])
    if kind == "tensor":
        return hos.summary_tensor(loss, params, u, part, 3, backend=backend)
    return hos.summary_diagonal(loss, params, u, part, 3, backend=backend)


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKEND)
def test_summaries_only_read(kind, backend):
    net, x, y = _stateful_model()
    params = dict(net.named_parameters())
    u = {k: torch.randn(v.shape, dtype=F64) for k, v in params.items()}
    part = hos.Partition.per_layer(net)
    before = _snapshot(net)
    _run(
        kind,
        _Counting(hos.model_loss(net, nn.CrossEntropyLoss(), x, y), backend),
        params,
        u,
        part,
        backend,
    )
    _assert_same(before, _snapshot(net))


@pytest.mark.parametrize(
    ("backend", "context"),
    [
        (b, c)
        for b in BACKENDS
        for c in ("no_grad", "inference_mode")
        if b != "reference" or c == "no_grad"
    ],
)
def test_caller_grad_mode_does_not_change_the_result(backend, context):
    """Regression: under torch.no_grad the reverse backend returned zeros."""
    net, x, y = _stateful_model()
    loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
    params, part = dict(net.named_parameters()), hos.Partition.per_layer(net)
    u = {k: torch.ones_like(v) for k, v in params.items()}
    expected = hos.summarize(loss, params, u, part, backend=backend)
    with getattr(torch, context)():
        got = hos.summarize(loss, params, u, part, backend=backend)
    assert got.H.abs().max() > 0
    torch.testing.assert_close(got.H, expected.H, **EXACT)
    torch.testing.assert_close(got.d3, expected.d3, **EXACT)


#: Loss calls per summary: reverse and reference evaluate the loss once (one graph,
#: one vmapped pass), forward many times.
INTERRUPT_CALLS = {"reverse": (1,), "forward": (1, 2), "reference": (1,)}


@pytest.mark.parametrize(("kind", "backend"), KIND_BACKEND)
def test_keyboard_interrupt_leaves_everything_as_it_was(kind, backend):
    net, x, y = _stateful_model()
    params = dict(net.named_parameters())
    u = {k: torch.randn(v.shape, dtype=F64) for k, v in params.items()}
    part = hos.Partition.per_layer(net)
    base = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
    before = _snapshot(net)
    clean = _run(kind, _Counting(base, backend), params, u, part, backend)
    for k in INTERRUPT_CALLS[backend]:
        with pytest.raises(KeyboardInterrupt):
            _run(kind, _Counting(base, backend, interrupt_at=k), params, u, part, backend)
        _assert_same(before, _snapshot(net))
    again = _run(kind, _Counting(base, backend), params, u, part, backend)
    assert torch.equal(clean, again)


@pytest.mark.parametrize("kind", ["summarize", "tensor", "diagonal"])
def test_keyboard_interrupt_during_the_backward_passes(kind):
    """The reverse backend builds one graph and then runs many backward passes."""
    net, x, y = _stateful_model()
    params = dict(net.named_parameters())
    u = {k: torch.randn(v.shape, dtype=F64) for k, v in params.items()}
    part = hos.Partition.per_layer(net)
    base = _Counting(hos.model_loss(net, nn.CrossEntropyLoss(), x, y), "reverse")
    wire = types.SimpleNamespace(calls=0, interrupt_at=None)

    def loss(p):
        return base({k: _Tripwire.apply(v, wire) for k, v in p.items()})

    before = _snapshot(net)
    clean = _run(kind, loss, params, u, part, "reverse")
    total = wire.calls
    assert total >= 8  # one per parameter tensor and backward pass
    for k in (1, total // 2, total):
        wire.calls, wire.interrupt_at = 0, k
        with pytest.raises(KeyboardInterrupt):
            _run(kind, loss, params, u, part, "reverse")
        _assert_same(before, _snapshot(net))
    wire.calls, wire.interrupt_at = 0, None
    assert torch.equal(clean, _run(kind, loss, params, u, part, "reverse"))


# ----------------------------------------------------------------------- optimizers
def _flat_state(opt) -> list[torch.Tensor]:
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x.detach().clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)):
            out.append(torch.tensor(float(x)))

    walk(opt.state_dict())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _opt_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 3, dtype=F64), torch.randn(16, 1, dtype=F64)
    return net, x, y


def test_grouped_newton_skips_a_non_finite_gradient():
    net, x, y = _opt_problem()
    loss = hos.model_loss(net, nn.MSELoss(), x, y)
    opt = hos.optim.GroupedNewton(net, loss, lr=0.1, period=2, warmup=1, average=1)
    for t in range(8):
        opt.zero_grad()
        nn.MSELoss()(net(x), y).backward()
        if t in (3, 4):  # 4 is a refresh step
            net[0].weight.grad[0, 0] = float("nan") if t == 3 else float("inf")
            params, state = [p.detach().clone() for p in net.parameters()], _flat_state(opt)
            with pytest.warns(
                hos.NonFiniteWarning, match=f"non-finite gradient at step {t - (t == 4)}"
            ):
                opt.step()
            assert _same(params, [p.detach() for p in net.parameters()])
            assert _same(state, _flat_state(opt))
        else:
            opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert all(torch.isfinite(t).all() for t in _flat_state(opt))


def test_sgdph_skips_a_non_finite_loss():
    net, x, y = _opt_problem()
    opt = hos.optim.SGDPH(net.parameters(), lr=0.05)
    for t in range(5):
        poison = float("nan") if t == 2 else 1.0

        def closure(poison=poison):
            return nn.MSELoss()(net(x), y) * poison

        if t == 2:
            params, state = [p.detach().clone() for p in net.parameters()], _flat_state(opt)
            with pytest.warns(hos.NonFiniteWarning, match="SGDPH: non-finite loss"):
                opt.step(closure)
            assert _same(params, [p.detach() for p in net.parameters()])
            assert _same(state, _flat_state(opt))
        else:
            opt.step(closure)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_grouped_newton_checkpoint_through_torch_save_resumes_bit_identically():
    """Mid-window (period 3, average 2): a torch.save/torch.load(weights_only=True) round trip."""
    import io

    def train(net, opt, steps, x, y):
        for _ in range(steps):
            opt.zero_grad()
            nn.MSELoss()(net(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    net, x, y = _opt_problem()
    make = lambda n: hos.optim.GroupedNewton(  # noqa: E731
        n, hos.model_loss(n, nn.MSELoss(), x, y), lr=0.05, period=3, average=2, warmup=1
    )
    opt = make(net)
    train(net, opt, 8, x, y)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    net2 = _opt_problem()[0]
    net2.load_state_dict(saved["model"])
    opt2 = make(net2)
    opt2.load_state_dict(saved["opt"])
    a, b = train(net, opt, 7, x, y), train(net2, opt2, 7, x, y)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_summarize_loader_only_reads_also_when_interrupted():
    from torch.utils.data import DataLoader, TensorDataset

    net, x, y = _stateful_model()
    loader = DataLoader(
        TensorDataset(torch.randn(12, 4, dtype=F64), torch.arange(12) % 3), batch_size=4
    )
    u = {k: torch.randn(v.shape, dtype=F64) for k, v in net.named_parameters()}
    part = hos.Partition.per_layer(net)
    calls = {"n": 0}

    def criterion(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 2:  # the second batch
            raise KeyboardInterrupt
        return nn.functional.cross_entropy(outputs, targets)

    before = _snapshot(net)
    hos.summarize_loader(net, nn.CrossEntropyLoss(), loader, u, part, progress=False)
    _assert_same(before, _snapshot(net))  # iterating the loader must not move the caller's RNG
    with pytest.raises(KeyboardInterrupt):
        hos.summarize_loader(net, criterion, loader, u, part, progress=False)
    _assert_same(before, _snapshot(net))

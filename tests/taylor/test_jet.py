"""Taylor mode (hos.taylor) against independent oracles, rule by rule, in float64.

Each rule of the tracker is checked on a small loss that applies a nonlinearity
first (so every Taylor coefficient of the rule's inputs is dense), then the
operation under test, then a weighted sum. The oracle is hos.reference
(nested jacfwd on φ), which shares no code with the tracker. The tests also
pin down that Taylor mode is really taken (no silent fallback) on every
architecture of tests/helpers/cases.py, that the fallback to reverse mode is exact, and
that chunking and the memory cap change nothing but the cost.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hos
from hos import reference
from hos._problem import Problem
from hos.backends import passes
from hos.backends import taylor as taylor_backend
from hos.backends.taylor import _pair_pass
from hos.taylor import TaylorFallback, UnivariateTracker, batching
from hos.taylor.univariate import SHARED_MIN_NUMEL
from tests.helpers.cases import CASES, build, oracle_diagonal, oracle_tensor
from tests.helpers.tolerances import DT, ROUNDOFF_ENTRYWISE
from tests.helpers.tolerances import assert_close as _close

ORDERS = (1, 3, 5)  # first order, the GroupedNewton one, and a high one


def _jet_pass(prob, order, groups):
    """(derivatives per group or None, the tracker) of one univariate Taylor-mode pass."""
    tracker = UnivariateTracker(order, passes.JET_MAX_BYTES)
    try:  # a fallback ends the pass, raised (and kept in tracker.fallback)
        moved = passes.seeded(prob, tracker, groups)
        with tracker.mode(), hos.ExactOps():
            value = prob.loss(moved)
        return passes.read_jets(tracker, value, groups), tracker
    except TaylorFallback:
        return None, tracker


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _params(seed=0):
    g = _gen(seed)
    return {
        "a": 0.7 * torch.randn(3, 4, generator=g, dtype=DT),
        "b": 0.5 * torch.randn(4, generator=g, dtype=DT),
        "c": torch.rand(3, 4, generator=g, dtype=DT) + 0.5,
    }


def _weights(shape, seed=5):
    return torch.randn(shape, generator=_gen(seed), dtype=DT)


def _smooth(p):
    """Dense Taylor coefficients of every order: a nonlinearity of the parameters."""
    return torch.tanh(p["a"] + p["b"]) * 1.3, torch.sigmoid(p["c"] * p["a"]) + 0.5


#: (id, f(h, k) -> tensor) with h, k of shape (3, 4); k > 0.5 (safe for log, sqrt, div).
RULES = [
    ("tanh", lambda h, k: torch.tanh(h)),
    ("sigmoid", lambda h, k: torch.sigmoid(h)),
    ("exp", lambda h, k: torch.exp(h)),
    ("log", lambda h, k: torch.log(k)),
    ("log1p", lambda h, k: torch.log1p(k)),
    ("sqrt", lambda h, k: torch.sqrt(k)),
    ("rsqrt", lambda h, k: torch.rsqrt(k)),
    ("reciprocal", lambda h, k: torch.reciprocal(k)),
    ("square", lambda h, k: torch.square(h)),
    ("pow-int", lambda h, k: h**3),
    ("pow-float", lambda h, k: k**1.7),
    ("sin", lambda h, k: torch.sin(h)),
    ("cos", lambda h, k: torch.cos(h)),
    ("relu", lambda h, k: F.relu(h)),
    ("leaky_relu", lambda h, k: F.leaky_relu(h, 0.2)),
    ("elu", lambda h, k: F.elu(h, alpha=0.7)),
    ("gelu", lambda h, k: F.gelu(h)),
    ("gelu-tanh", lambda h, k: F.gelu(h, approximate="tanh")),
    ("silu", lambda h, k: F.silu(h)),
    ("softplus", lambda h, k: F.softplus(h, beta=2.0)),
    ("erf", lambda h, k: torch.erf(h)),
    ("mul", lambda h, k: h * k),
    ("mul-self", lambda h, k: h * h),
    ("mul-const", lambda h, k: h * 3.0),
    # both factors moving along the same lines: the Leibniz rule (hos.taylor.leibniz)
    ("mul-same-lines", lambda h, k: (h + k) * torch.sin(h * k)),
    ("mul-same-lines-ranks", lambda h, k: (h + k).sum(0) * torch.sin(h * k)),
    ("mul-method-broadcast", lambda h, k: torch.sin(h + k).mul(torch.cos(h * k).unsqueeze(0))),
    ("add-same-lines", lambda h, k: torch.sin(h + k) + torch.cos(h * k)),
    ("sub-same-lines-ranks", lambda h, k: torch.sin(h + k).sum(0) - torch.cos(h * k)),
    ("div-moving", lambda h, k: h / k),
    ("div-const", lambda h, k: h / 2.5),
    ("rsub-int", lambda h, k: 1 - h),
    ("add-int", lambda h, k: h + 2),
    ("add-alpha", lambda h, k: torch.add(h, k, alpha=-0.5)),
    ("cat-const", lambda h, k: torch.cat([h, torch.ones(3, 2, dtype=DT)], dim=1)),
    ("stack", lambda h, k: torch.stack([h, k], 0)),
    ("where-const", lambda h, k: torch.where(h > 0, h, 0.25)),
    ("masked_fill", lambda h, k: h.masked_fill(h < 0, 1.5)),
    ("matmul", lambda h, k: h @ k.T),
    ("einsum", lambda h, k: torch.einsum("ij,ij->i", h, k)),
    ("linear-bias", lambda h, k: F.linear(h, k, k[:, 0])),
    ("sum-mean", lambda h, k: h.sum(1) * k.mean(0).sum()),
    ("views", lambda h, k: h.reshape(2, 6).t().flatten()[2:9].view(7, 1)),
    ("softmax", lambda h, k: torch.softmax(h, dim=1)),
    ("log_softmax", lambda h, k: F.log_softmax(h, dim=0)),
    ("logsumexp", lambda h, k: torch.logsumexp(h, dim=1)),
    ("cross_entropy", lambda h, k: F.cross_entropy(h, torch.tensor([1, 0, 3]))),
    ("nll_loss-sum", lambda h, k: F.nll_loss(h, torch.tensor([1, 0, 3]), reduction="sum")),
    ("mse", lambda h, k: F.mse_loss(h, k)),
    ("var", lambda h, k: torch.var(h, dim=1)),
    ("broadcast", lambda h, k: torch.broadcast_tensors(h[:, :1], k)[0] * k),
    ("max_pool", lambda h, k: F.max_pool1d(h.unsqueeze(0), 2).squeeze(0)),
    ("avg_pool", lambda h, k: F.avg_pool1d(h.unsqueeze(0), 2).squeeze(0)),
    (
        "conv1d-bias",
        lambda h, k: F.conv1d(h.unsqueeze(0), torch.stack([k[:, :2], k[:, 2:]]), k[0, :2]),
    ),
    ("amax", lambda h, k: h.amax(1)),
]


#: rules that only the univariate tracker's generic nested-jvp rule covers
_POLY_GENERIC = {"var", "amax"}


def _rule_loss(f):
    weights = _weights(f(*_smooth(_params())).shape)

    def loss(p):
        return (f(*_smooth(p)) * weights).sum()

    return loss


@pytest.mark.parametrize("rule", [r[0] for r in RULES])
def test_rule_matches_reference(rule):
    f = dict(RULES)[rule]
    loss, params = _rule_loss(f), _params()
    u = {k: torch.randn(v.shape, generator=_gen(3), dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    prob = Problem(loss, params, u, part)
    result, tracker = _jet_pass(prob, max(ORDERS), range(prob.S))
    assert result is not None, f"{rule}: Taylor mode fell back: {tracker.fallback}"
    got = torch.stack([result[s] for s in range(prob.S)], dim=1)  # (order, S)
    for order in ORDERS:
        expected = reference.summary_diagonal(loss, params, u, part, order)
        _close(got[order - 1], expected, f"{rule} order {order}")
    # the one-pass summary: mixed second-order coefficients of every pair of groups
    one_pass, _ = _pair_pass(prob)
    assert one_pass is not None, f"{rule}: the one-pass summary gave up"
    g, H, d3, _ = one_pass
    _close(g, reference.summary_tensor(loss, params, u, part, 1), f"{rule} one-pass g")
    _close(H, reference.summary_tensor(loss, params, u, part, 2), f"{rule} one-pass H")
    _close(d3, got[2], f"{rule} one-pass d3")
    # the full D³ by multivariate Taylor mode (every mixed coefficient up to degree 3)
    D3 = taylor_backend._poly_pass(prob, 3)
    if rule in _POLY_GENERIC:
        assert D3 is None, f"{rule}: expected the multivariate tracker to fall back"
    else:
        assert D3 is not None, f"{rule}: the multivariate tracker fell back"
        _close(D3, reference.summary_tensor(loss, params, u, part, 3), f"{rule} multivariate D3")


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_taylor_mode_is_taken_and_exact_on_every_architecture(case_id, monkeypatch):
    """No silent fallback on the 15 architecture cases: the jets themselves vs the oracle
    (the one-pass summary with an unlimited pair budget: its exactness, not its policy)."""
    monkeypatch.setattr(taylor_backend, "PAIR_BUDGET", float("inf"))
    b = build(case_id)
    loss = hos.model_loss(b.model, b.criterion, b.inputs, b.targets)
    prob = Problem(loss, b.params, b.direction, b.partition)
    with hos.ExactOps():
        result, tracker = _jet_pass(prob, 4, range(prob.S))
    assert result is not None, f"{case_id}: Taylor mode fell back: {tracker.fallback}"
    for order in (3, 4):
        got = torch.stack([result[s][order - 1] for s in range(prob.S)])
        _close(got, oracle_diagonal(case_id, order), f"{case_id} diag D^({order})")
    with hos.ExactOps():
        one_pass, _ = _pair_pass(prob)
    assert one_pass is not None, f"{case_id}: the one-pass summary gave up"
    _close(one_pass[0], oracle_tensor(case_id, 1), f"{case_id} one-pass g")
    _close(one_pass[1], oracle_tensor(case_id, 2), f"{case_id} one-pass H")


def _inplace_loss(p):
    h = torch.tanh(p["a"]) * 1.0
    h.mul_(2.0)  # an in-place write into a tensor that moves with t
    return (h * p["c"]).sum() + (p["b"] ** 3).sum()


def test_inplace_writes_are_followed():
    """An in-place write into a moving tensor is computed out of place and copied back:
    Taylor mode follows it (no fallback) and matches the oracle."""
    params = _params(1)
    u = {k: torch.randn(v.shape, generator=_gen(4), dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    result, tracker = _jet_pass(Problem(_inplace_loss, params, u, part), 3, range(3))
    assert result is not None, tracker.fallback
    oracle = reference.summary_tensor(_inplace_loss, params, u, part, 3)
    for s in range(3):
        _close(result[s][2], oracle[s, s, s], f"in-place d3[{s}]")


def test_unfollowable_write_falls_back_to_reverse_exactly(monkeypatch):
    """A write Taylor mode has no out-of-place twin for (simulated: every in-place op has
    one today) sends the pass to reverse mode, exactly, with the reason recorded."""
    monkeypatch.setattr("hos.taylor.engine.out_of_place", lambda func, args, kwargs: None)
    params = _params(1)
    u = {k: torch.randn(v.shape, generator=_gen(4), dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    result, tracker = _jet_pass(Problem(_inplace_loss, params, u, part), 3, range(3))
    assert result is None and "in-place mul_" in tracker.fallback.reason
    s = hos.summarize(_inplace_loss, params, u, part, backend="taylor")
    assert "in-place mul_" in " ".join(hos.last_fallback().reasons)
    oracle = reference.summary_tensor(_inplace_loss, params, u, part, 3)
    _close(s.d3, torch.einsum("iii->i", oracle), "fallback d3")
    diag = hos.summary_diagonal(_inplace_loss, params, u, part, 4, backend="taylor")
    _close(diag, reference.summary_diagonal(_inplace_loss, params, u, part, 4), "fallback d4")


def _mlp_case():
    b = build("mlp-tanh-ce-per_tensor")
    return hos.model_loss(b.model, b.criterion, b.inputs, b.targets), b


@pytest.mark.parametrize("chunk", [1, 2, 3, None])
def test_chunking_changes_nothing_but_cost(chunk):
    loss, b = _mlp_case()
    expected = oracle_diagonal(b.id, 3)
    s = hos.summarize(loss, b.params, b.direction, b.partition, chunk=chunk)
    _close(s.d3, expected, f"summarize chunk={chunk}")
    diag = hos.summary_diagonal(loss, b.params, b.direction, b.partition, 3, chunk=chunk)
    _close(diag, expected, f"summary_diagonal chunk={chunk}")


def test_memory_cap_halves_the_chunk(monkeypatch, caplog):
    loss, b = _mlp_case()
    prob = Problem(loss, b.params, b.direction, b.partition)
    with hos.ExactOps():
        _, tracker = _jet_pass(prob, 3, range(prob.S))
        full = tracker.peak_bytes
        _, tracker = _jet_pass(prob, 3, [0])
        one = tracker.peak_bytes
    assert 0 < one < full
    monkeypatch.setattr(passes, "JET_MAX_BYTES", (one + full) // 2)
    with caplog.at_level("DEBUG", logger="hos"):
        diag = hos.summary_diagonal(loss, b.params, b.direction, b.partition, 3, chunk=prob.S)
    assert "chunk halved" in caplog.text
    assert hos.last_fallback() is None
    _close(diag, oracle_diagonal(b.id, 3), "capped diag")


def _coefficient_peak(fn, x: torch.Tensor, order: int = 3) -> int:
    """The tracker's peak of coefficient bytes over one call of `fn` on `x` moving along a line."""
    tracker = UnivariateTracker(order, passes.JET_MAX_BYTES)
    moving = x.clone()
    tracker.seed(moving, 0, torch.ones_like(x))
    with tracker.mode():
        fn(moving).sum()
    return tracker.peak_bytes


def test_views_of_coefficients_count_once():
    """A jet that views another's coefficients (view, transpose, slice, unsqueeze: each
    coefficient viewed on its own above `STACK_MAX_NUMEL`) holds no new memory, and the count
    says so (blocks from `SHARED_MIN_NUMEL` elements on); a copy adds its own coefficients."""
    x = torch.randn(256, 256, dtype=DT)
    assert x.numel() >= max(SHARED_MIN_NUMEL, batching.STACK_MAX_NUMEL)
    stack = 3 * x.numel() * x.element_size()  # coefficients 1..3 of one (256 × 256) tensor

    def product(v):
        return (v * v).exp()

    plain = _coefficient_peak(product, x)
    viewed = _coefficient_peak(lambda v: product(v).view(128, 512).t()[5:].unsqueeze(0), x)
    copied = _coefficient_peak(lambda v: product(v).view(128, 512).t().contiguous(), x)
    assert viewed == plain
    assert copied > plain
    # the count is what the coefficients' storages hold, each once: the exp's three
    # coefficients and the product's and the seed's, not more
    assert stack <= plain <= 2 * stack


def test_memory_cap_below_one_group_falls_back(monkeypatch):
    loss, b = _mlp_case()
    monkeypatch.setattr(passes, "JET_MAX_BYTES", 1)
    s = hos.summarize(loss, b.params, b.direction, b.partition)
    record = hos.last_fallback()
    assert record is not None and "exceed" in " ".join(record.reasons)
    assert not record.certificate and set(record.groups) == set(b.partition.names)
    _close(s.d3, oracle_diagonal(b.id, 3), "fallback d3 under the cap")


def test_jets_do_not_touch_the_models_state():
    b = build("conv-bn-ce-per_layer")
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    loss = hos.model_loss(b.model, b.criterion, b.inputs, b.targets)
    hos.summary_diagonal(loss, b.params, b.direction, b.partition, 4, backend="taylor")
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_rows_path_for_large_S_is_exact(case_id, monkeypatch):
    """Past PAIR_MAX_GROUPS, summarize takes reverse rows + univariate jets: same numbers."""
    monkeypatch.setattr(taylor_backend, "PAIR_MAX_GROUPS", 0)
    b = build(case_id)
    loss = hos.model_loss(b.model, b.criterion, b.inputs, b.targets)
    s = hos.summarize(loss, b.params, b.direction, b.partition, backend="taylor")
    _close(s.g, oracle_tensor(case_id, 1), f"{case_id} rows g")
    _close(s.H, oracle_tensor(case_id, 2), f"{case_id} rows H")
    _close(s.d3, oracle_diagonal(case_id, 3), f"{case_id} rows d3")


def test_pair_budget_gives_up_and_rows_take_over(monkeypatch, caplog):
    monkeypatch.setattr(taylor_backend, "PAIR_BUDGET", 1e-3)
    loss, b = _mlp_case()
    with caplog.at_level("INFO", logger="hos"):
        s = hos.summarize(loss, b.params, b.direction, b.partition)
    assert "one-pass summary gives way to reverse rows" in caplog.text
    assert hos.last_fallback() is None  # the rows path is still Taylor mode for d3
    _close(s.H, oracle_tensor(b.id, 2), "H after the pair budget")
    _close(s.d3, oracle_diagonal(b.id, 3), "d3 after the pair budget")


def test_no_grad_block_inside_the_loss_is_a_constant_as_in_reverse_mode():
    params = _params(2)
    u = {k: torch.randn(v.shape, generator=_gen(6), dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)

    def loss(p):
        with torch.no_grad():
            scale = p["c"].norm()  # e.g. a weight-norm statistic kept out of the graph
        return (torch.tanh(p["a"] * scale) * p["b"]).sum() + (p["c"] ** 3).sum()

    for backend in ("taylor", "reverse"):
        s = hos.summarize(loss, params, u, part, backend=backend)
        d4 = hos.summary_diagonal(loss, params, u, part, 4, backend=backend)
        if backend == "taylor":
            taylor = (s, d4)
    _close(taylor[0].H, s.H, "no_grad block: H")
    _close(taylor[0].d3, s.d3, "no_grad block: d3")
    _close(taylor[1], d4, "no_grad block: d4")


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_multivariate_taylor_full_tensor_on_every_architecture(case_id, caplog):
    """D³ (and D⁴ where cheap) from one forward pass with every mixed coefficient."""
    b = build(case_id)
    loss = hos.model_loss(b.model, b.criterion, b.inputs, b.targets)
    prob = Problem(loss, b.params, b.direction, b.partition)
    orders = (3, 4) if prob.S <= 4 else (3,)
    for order in orders:
        with hos.ExactOps(), caplog.at_level("INFO", logger="hos"):
            got = taylor_backend._poly_pass(prob, order)
        assert got is not None, caplog.text  # recurrent kernels too (unrolled into cells)
        _close(got, oracle_tensor(case_id, order), f"{case_id} multivariate D^({order})")


def test_multivariate_taylor_monomial_cap_falls_back(monkeypatch):
    loss, b = _mlp_case()
    monkeypatch.setattr(taylor_backend, "POLY_MAX_MONOMIALS", 3)
    D3 = hos.summary_tensor(loss, b.params, b.direction, b.partition, 3, backend="taylor")
    _close(D3, oracle_tensor(b.id, 3), "capped multivariate D3")


def test_multivariate_taylor_follows_inplace_writes():
    params = _params(1)
    u = {k: torch.randn(v.shape, generator=_gen(4), dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    with hos.ExactOps():  # in-place writes are followed by the multivariate tracker too
        D3 = taylor_backend._poly_pass(Problem(_inplace_loss, params, u, part), 3)
    assert D3 is not None
    _close(D3, reference.summary_tensor(_inplace_loss, params, u, part, 3), "in-place D3")


def _wide_then_narrow():
    """A CNN whose first layers are wide (large activations) and whose last ones are small:
    the adaptive chunk should carry few early groups per pass and many late ones."""
    torch.manual_seed(0)
    layers = [
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(4),
    ]
    layers += [torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 8)]
    for _ in range(6):
        layers += [torch.nn.Tanh(), torch.nn.Linear(8, 8)]
    net = torch.nn.Sequential(*layers).double()  # fmt: skip
    x = torch.randn(4, 3, 16, 16, dtype=DT, generator=_gen(1))
    y = torch.randint(0, 8, (4,), generator=_gen(2))
    loss = hos.model_loss(net, torch.nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in net.named_parameters()}
    u = hos.random_direction(params, seed=3)
    return loss, params, u, hos.Partition.per_tensor(params)


def test_adaptive_chunks_grow_along_the_network_within_the_budget(monkeypatch):
    loss, params, u, part = _wide_then_narrow()
    passes_seen, stopped = [], []
    real = passes.jet_pass

    def spy(prob, order, groups, usage=None, **kw):
        usage = {} if usage is None else usage
        try:
            out = real(prob, order, groups, usage, **kw)
        except hos.taylor.TaylorFallback as exc:
            stopped.append((list(groups), exc.out_of_memory))
            raise
        passes_seen.append((list(groups), dict(usage)))
        return out

    monkeypatch.setattr(passes, "jet_pass", spy)
    monkeypatch.setattr(passes, "JET_FLOOR_BYTES", 0)  # this model is small: bound it anyway
    with hos.ExactOps():
        diag = hos.summary_diagonal(loss, params, u, part, 3)
    # the first try carries every group under the floor; past it, it stops and a probe sizes
    assert stopped == [(list(range(min(len(part), passes.MAX_CHUNK))), True)], stopped
    sizes = [len(g) for g, _ in passes_seen]
    # the next call of the same loss remembers it: no try, the same passes
    passes_seen.clear()
    with hos.ExactOps():
        again = hos.summary_diagonal(loss, params, u, part, 3)
    assert len(stopped) == 1 and [len(g) for g, _ in passes_seen] == sizes
    assert torch.equal(again, diag)
    assert sizes[0] == passes.PROBE_CHUNK
    assert sum(sizes) == len(part) and max(sizes) > sizes[0], sizes
    param_bytes = sum(v.numel() * v.element_size() for v in params.values())
    activations = max(usage["activations"] for _, usage in passes_seen)
    budget = passes.JET_BUDGET * (param_bytes + activations)
    # every pass sized from the previous ones keeps its coefficients within the budget
    for groups, usage in passes_seen[1:]:
        assert usage["coefficients"] <= budget, (groups, usage["coefficients"], budget)
    # the early (wide) groups would not have fit all in one pass: the bound did something
    assert passes_seen[0][1]["coefficients"] / 2 * len(part) > budget
    # and the chunking changes nothing but the cost
    monkeypatch.setattr(passes, "jet_pass", real)
    exact = hos.summary_diagonal(loss, params, u, part, 3, backend="reverse")  # nested backward
    _close(diag, exact, "adaptive diag D3")
    fixed = hos.summary_diagonal(loss, params, u, part, 3, chunk=1)
    assert torch.allclose(diag, fixed, **ROUNDOFF_ENTRYWISE)
    s = hos.summarize(loss, params, u, part)
    _close(s.d3, diag, "summarize d3 (adaptive chunks)")


def test_a_small_model_takes_one_pass(monkeypatch):
    """Below the floor every group rides one pass: no probe pass that repeats the forward."""
    loss, b = _mlp_case()
    seen = []
    real = passes.jet_pass

    def spy(prob, order, groups, usage=None, **kw):
        seen.append(list(groups))
        return real(prob, order, groups, usage, **kw)

    monkeypatch.setattr(passes, "jet_pass", spy)
    diag = hos.summary_diagonal(loss, b.params, b.direction, b.partition, 3)
    assert seen == [list(range(len(b.partition)))], seen
    _close(diag, oracle_diagonal(b.id, 3), "one-pass diag D3")


def test_sums_along_the_same_lines_add_coefficients(monkeypatch):
    """The rules above check its values against the oracle; this pins that they ran it."""
    from hos.taylor import univariate

    taken = []
    real = univariate.difference
    monkeypatch.setattr(univariate, "difference", lambda *a: taken.append(out := real(*a)) or out)
    for rule in ("add-same-lines", "sub-same-lines-ranks"):
        taken.clear()
        params = _params()
        u = {k: torch.randn(v.shape, generator=_gen(3), dtype=DT) for k, v in params.items()}
        prob = Problem(_rule_loss(dict(RULES)[rule]), params, u, hos.Partition.per_tensor(params))
        assert _pair_pass(prob)[0] is not None
        assert any(t is not None and t.mixed is not None for t in taken), rule


def test_products_along_the_same_lines_take_the_leibniz_rule(monkeypatch):
    """The rules above check its values against the oracle; this pins that they ran it."""
    from hos.taylor import univariate

    taken = []
    real = univariate.product
    monkeypatch.setattr(univariate, "product", lambda *a: taken.append(out := real(*a)) or out)
    for rule in ("mul-same-lines", "mul-same-lines-ranks", "mul-method-broadcast", "mul"):
        taken.clear()
        params = _params()
        u = {k: torch.randn(v.shape, generator=_gen(3), dtype=DT) for k, v in params.items()}
        prob = Problem(_rule_loss(dict(RULES)[rule]), params, u, hos.Partition.per_tensor(params))
        assert _pair_pass(prob)[0] is not None
        used = [t for t in taken if t is not None]
        if rule == "mul":  # h on lines (a, b), k on (c, a): the general multilinear rule
            assert taken and not used
        else:
            assert used and all(t.mixed is not None for t in used), rule


def test_the_gradient_probe_counts_what_the_graph_saves():
    """tanh(x Wᵀ)·t summed: a gradient's graph saves x (for W's gradient), tanh's output and t
    (for the product's), W itself apart — counted by hand, each storage once."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.Tanh()).to(DT)
    x, t = torch.randn(3, 5, dtype=DT), torch.randn(3, 4, dtype=DT)
    loss = hos.model_loss(net, lambda out, target: (out * target).sum(), x, t)
    params = {k: p.detach() for k, p in net.named_parameters()}
    prob = Problem(
        loss, params, hos.random_direction(params, seed=1), hos.Partition.per_tensor(params)
    )
    output_bytes = 3 * 4 * 8
    assert passes.gradient_graph_bytes(prob) == x.nbytes + output_bytes + t.nbytes


def test_the_gradient_cap_is_measured_once_and_only_where_the_activations_are_large(monkeypatch):
    loss, params, u, part = _wide_then_narrow()
    probes = []
    real = passes.gradient_graph_bytes
    monkeypatch.setattr(passes, "gradient_graph_bytes", lambda p: probes.append(1) or real(p))
    hos.summary_diagonal(loss, params, u, part, 3)  # small: the floor decides, no probe
    assert probes == []
    monkeypatch.setattr(passes, "JET_FLOOR_BYTES", 0)
    monkeypatch.setattr(passes, "GRADIENT_MULTIPLE", 0.0)  # the cap alone decides: 1 group
    sizes = []
    real_pass = passes.jet_pass
    monkeypatch.setattr(
        passes, "jet_pass", lambda prob, order, g, usage=None, **kw: sizes.append(len(g))
        or real_pass(prob, order, g, usage, **kw),
    )  # fmt: skip
    diag = hos.summary_diagonal(loss, params, u, part, 3)
    # the try under the (zero) floor stops at once; then the probe, then one group a pass
    first_try, probe, rest = sizes[0], sizes[1], sizes[2:]
    assert probes == [1] and first_try == min(len(part), passes.MAX_CHUNK), sizes
    assert probe == passes.PROBE_CHUNK and set(rest) == {1}, sizes
    _close(diag, hos.summary_diagonal(loss, params, u, part, 3, backend="reverse"), "capped")

"""The default backend is never silently wrong (issue 15).

Every backend, on everyday model code (tests/helpers/constructs.py), against finite differences
of φ(η) = L(θ + Σ η_s u_s) with Richardson extrapolation (tests/helpers/fd.py) — an oracle that
only evaluates the loss, so no automatic differentiation can fool it — and against each
other. Taylor mode must follow the constructs it claims to (no fallback), and record a
fallback with its reason for the others. The certificate is tested by breaking a rule on
purpose: the wrong coefficients must be caught, recomputed exactly, warned about and
recorded. Bad cases (random sampling, an op without derivatives) get hos's own errors.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import pytest
import torch
from torch import nn

import hos
from hos._refusals import RandomLossError
from hos.backends import certificate as _certificate
from hos.backends import certificate as certify
from tests.helpers import fd
from tests.helpers.constructs import BY_ID, CONSTRUCTS, DT, KINKED, Base
from tests.helpers.tolerances import EXACT, FD, FD_CLOSED_FORM

pytestmark = pytest.mark.usefixtures("single_thread")

#: Oracle accuracy (measured on closed forms below and on these models): relative to the
#: largest entry, ḡ to 1e-8, H̄ to 1e-6, diag D³ to 1e-5, diag D⁴ to 1e-4.
RTOL = FD
BACKENDS = ("taylor", "reverse", "forward", "reference")
#: Backends against each other (the same exact numbers by other compositions of AD).
AGREE = EXACT["rtol"]


# --------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_finite_differences_on_a_closed_form(order):
    """d^k/dt^k exp(sin(1.3 t + 0.4)) at 0 against its closed form."""
    a, b = 1.3, 0.4
    s, c = math.sin(b), math.cos(b)
    e = math.exp(s)
    exact = {
        1: a * c * e,
        2: a * a * e * (c * c - s),
        3: a**3 * e * (c**3 - 3 * s * c - c),
        4: a**4 * e * (c**4 - 6 * s * c * c - 4 * c * c + 3 * s * s + s),
    }[order]
    got = fd.line_derivative(lambda t: math.exp(math.sin(a * t + b)), order)
    assert abs(got - exact) <= FD_CLOSED_FORM[order] * abs(exact)


def test_mixed_finite_difference_on_a_closed_form():
    """∂²/∂a∂b exp(a·b + 2a − b) at 0 = 1 + 2·(−1) = −1."""
    got = fd.mixed_derivative(lambda a, b: math.exp(a * b + 2 * a - b))
    assert abs(got + 1.0) <= FD_CLOSED_FORM[2]


def test_finite_differences_on_a_polynomial_loss():
    """φ of L = Σ w⁴/4 + (w·v)² with u = 1: exact derivatives in closed form."""
    params = {"w": torch.tensor([0.3, -0.7], dtype=DT), "v": torch.tensor([1.1, 0.4], dtype=DT)}
    u = {k: torch.ones(2, dtype=DT) for k in params}

    def loss(p):
        return (p["w"] ** 4).sum() / 4 + (p["w"] @ p["v"]) ** 2

    path = fd.Path(loss, params, u, hos.Partition.per_tensor(params))
    w, v = params["w"], params["v"]
    wv = float(w @ v)
    g = torch.tensor([float((w**3).sum()) + 2 * wv * float(v.sum()),
                      2 * wv * float(w.sum())], dtype=DT)  # fmt: skip
    fd.close(path.g(), g, FD_CLOSED_FORM[1], "fd ḡ")
    H01 = 2 * float(w.sum()) * float(v.sum()) + 2 * wv * 2
    H = torch.tensor([[3 * float((w**2).sum()) + 2 * float(v.sum()) ** 2, H01],
                      [H01, 2 * float(w.sum()) ** 2]], dtype=DT)  # fmt: skip
    fd.close(path.H(), H, FD_CLOSED_FORM[2], "fd H̄")
    fd.close(
        path.diagonal(3),
        torch.tensor([6 * float(w.sum()), 0.0], dtype=DT),
        FD_CLOSED_FORM[3],
        "fd d3",
    )


# --------------------------------------------------------------------------- the matrix
def _setup(construct_id: str):
    c = BY_ID[construct_id]
    torch.manual_seed(0)
    model = c.build().to(DT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=gen)
    criterion = c.criterion if c.criterion is not None else nn.CrossEntropyLoss()
    if isinstance(criterion, nn.BCEWithLogitsLoss):  # multi-label targets in [0, 1]
        y = torch.rand(7, 3, generator=gen, dtype=DT)
    loss = hos.model_loss(model, criterion, x, y)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    u = {k: torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()}
    return c, model, loss, params, u, hos.Partition.per_tensor(params)


@functools.cache
def _oracle(construct_id: str):
    """(ḡ, H̄, diag D³, trusted-entry masks) by finite differences of the model's own loss.

    For ``eval_oracle`` constructs the model is evaluated in eval mode: the meaning hos
    gives dropout (off) and spectral norm's power iteration (held at its current vectors)
    during summaries. For kinked ones, an entry counts only where steps h and h/2 agree.
    """
    c, model, loss, params, u, part = _setup(construct_id)
    if c.eval_oracle:
        model.eval()
    path = fd.Path(loss, params, u, part)
    out = {"g": path.g(), "H": path.H(), "d3": path.diagonal(3)}
    masks = {}
    for key in out:
        tol = RTOL[key]
        if construct_id in KINKED and key != "g":
            half = {"H": lambda: path.H(fd.STEPS[2] / 2),
                    "d3": lambda: path.diagonal(3, fd.STEPS[3] / 2)}[key]()  # fmt: skip
            masks[key] = fd.agrees(out[key], half, tol)
        else:
            masks[key] = None
    return out, masks


@functools.cache
def _summary(construct_id: str, backend: str):
    c, model, loss, params, u, part = _setup(construct_id)
    _certificate.clear()
    s = hos.summarize(loss, params, u, part, backend=backend)
    return s, hos.last_fallback()


#: (construct, backend) pairs with an answer: forward-mode backends refuse a custom
#: Function without a jvp and linalg.solve (tested in test_forward_mode_refusals_are_hos_errors).
MATRIX = [
    (c.id, b)
    for c in CONSTRUCTS
    for b in BACKENDS
    if c.forward_modes or b not in ("forward", "reference")
]


@pytest.mark.parametrize("construct_id, backend", MATRIX)
def test_every_backend_matches_finite_differences(construct_id, backend):
    s, _ = _summary(construct_id, backend)
    expected, masks = _oracle(construct_id)
    for key, actual in (("g", s.g), ("H", s.H), ("d3", s.d3)):
        fd.close(actual, expected[key], RTOL[key], f"{construct_id} {backend} {key}", masks[key])


@pytest.mark.parametrize("construct_id", [c.id for c in CONSTRUCTS])
def test_backends_agree_with_each_other(construct_id):
    base, _ = _summary(construct_id, "reverse")
    for backend in ("taylor", "forward", "reference"):
        if not BY_ID[construct_id].forward_modes and backend != "taylor":
            continue
        s, _ = _summary(construct_id, backend)
        for key in ("g", "H", "d3"):
            fd.close(getattr(s, key), getattr(base, key), AGREE, f"{construct_id} {backend} {key}")


@pytest.mark.parametrize("construct_id", [c.id for c in CONSTRUCTS])
def test_taylor_mode_follows_or_records_why_not(construct_id):
    c = BY_ID[construct_id]
    _, record = _summary(construct_id, "taylor")
    if c.followed:
        assert record is None, f"{construct_id}: Taylor mode fell back: {record}"
    else:
        assert record is not None and not record.certificate, construct_id
        assert record.reasons and all(r for r in record.reasons)


def test_fallback_reasons_name_the_construct():
    reasons = {cid: " ".join(_summary(cid, "taylor")[1].reasons)
               for cid in ("fft", "complex_view", "custom_function", "linalg_solve")}  # fmt: skip
    assert "forward-mode derivatives" in reasons["linalg_solve"]
    assert "complex" in reasons["fft"] and "fft" in reasons["fft"]
    assert "complex" in reasons["complex_view"]
    assert "Cube" in reasons["custom_function"]


@pytest.mark.parametrize("construct_id", [c.id for c in CONSTRUCTS])
def test_model_state_untouched(construct_id):
    c, model, loss, params, u, part = _setup(construct_id)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    hos.summarize(loss, params, u, part)
    hos.summary_diagonal(loss, params, u, part, 4)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{construct_id}: {k} changed"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("construct_id", ["type_as", "setitem", "inplace_chain", "weight_norm"])
def test_full_third_order_tensor_and_fourth_diagonal(construct_id):
    """D³ by every path (multivariate Taylor mode, reverse) and diag D⁴ against the oracle."""
    c, model, loss, params, u, part = _setup(construct_id)
    D3 = hos.summary_tensor(loss, params, u, part, 3)
    expected, _ = _oracle(construct_id)
    fd.close(torch.einsum("iii->i", D3), expected["d3"], RTOL["d3"], f"{construct_id} D3")
    reverse = hos.summary_tensor(loss, params, u, part, 3, backend="reverse")
    fd.close(D3, reverse, AGREE, f"{construct_id} D3 taylor vs reverse")
    d4 = hos.summary_diagonal(loss, params, u, part, 4)
    fd.close(d4, fd.Path(loss, params, u, part).diagonal(4), RTOL["d4"], f"{construct_id} diag D4")
    d4_reverse = hos.summary_diagonal(loss, params, u, part, 4, backend="reverse")
    fd.close(d4, d4_reverse, AGREE, f"{construct_id} diag D4 taylor vs reverse")


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("construct_id, what", [("custom_function", "Cube"),
                                                 ("linalg_solve", "linalg_solve")])  # fmt: skip
def test_forward_mode_refusals_are_hos_errors(construct_id, what):
    _, _, loss, params, u, part = _setup(construct_id)
    for backend in ("forward", "reference"):
        with pytest.raises(NotImplementedError, match=rf"^hos: .*{what}.*backend='reverse'"):
            hos.summarize(loss, params, u, part, backend=backend)


def test_smooth_ops_pytorch_cannot_differentiate_are_refused():
    """torch.special.bessel_j0 is smooth, but PyTorch declares it non-differentiable: every
    AD mode would take it for a constant, silently. On a moving input hos refuses; on a
    constant one it is fine."""

    def moving(p):
        return torch.special.bessel_j0(torch.tanh(p["w"])).sum() + (p["w"] ** 2).sum()

    def constant(p):
        return (torch.special.bessel_j0(torch.linspace(0, 1, 5, dtype=DT)) * p["w"] ** 3).sum()

    params = {"w": torch.rand(5, generator=torch.Generator().manual_seed(9), dtype=DT)}
    part = hos.Partition.per_tensor(params)

    class Bessel(nn.Module):
        def forward(self, h):
            return torch.special.bessel_j0(h)

    net = nn.Sequential(nn.Linear(3, 4), Bessel(), nn.Linear(4, 2)).to(DT)
    gen = torch.Generator().manual_seed(10)
    net_loss = hos.model_loss(net, nn.MSELoss(), torch.randn(5, 3, generator=gen, dtype=DT),
                              torch.randn(5, 2, generator=gen, dtype=DT))  # fmt: skip
    net_params = {k: v.detach() for k, v in net.named_parameters()}
    net_part = hos.Partition.per_tensor(net_params)
    for backend in BACKENDS:
        with pytest.raises(NotImplementedError, match=r"^hos: torch.special.bessel_j0 has no"):
            hos.summarize(moving, params, params, part, backend=backend)
        with pytest.raises(NotImplementedError, match=r"bessel_j0 in 1 \(Bessel\) has no"):
            hos.summarize(net_loss, net_params, net_params, net_part, backend=backend)
            hos.summarize(moving, params, params, part, backend=backend)
    for backend in ("taylor", "reverse"):
        s = hos.summarize(constant, params, params, part, backend=backend)
        fd.close(s.d3, fd.Path(constant, params, params, part).diagonal(3), RTOL["d3"], backend)
    for backend in ("forward", "reference"):  # torch.func cannot tell a constant input
        with pytest.raises(NotImplementedError, match=r"backend='reverse' or 'auto' can"):
            hos.summarize(constant, params, params, part, backend=backend)


def test_random_sampling_in_the_loss_is_refused_with_the_module_path():
    class Noisy(Base):
        def mid(self, h):
            return h + 0.1 * torch.randn_like(h)

    torch.manual_seed(0)
    model = Noisy().to(DT)
    x, y = torch.randn(4, 6, dtype=DT), torch.tensor([0, 1, 2, 0])
    loss = hos.model_loss(model, nn.CrossEntropyLoss(), x, y)
    params = {k: p.detach() for k, p in model.named_parameters()}
    for backend in BACKENDS:
        with pytest.raises(RandomLossError, match=r"randn_like in Noisy \(Noisy\)"):
            hos.summarize(loss, params, params, hos.Partition.per_tensor(params), backend=backend)


def test_random_sampling_in_a_submodule_names_its_path():
    class Jitter(nn.Module):
        def forward(self, h):
            return h * torch.rand(h.shape, dtype=h.dtype)

    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), Jitter()), nn.Linear(4, 2))
    net = net.to(DT)
    loss = hos.model_loss(
        net, nn.MSELoss(), torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    )
    params = {k: p.detach() for k, p in net.named_parameters()}
    with pytest.raises(RandomLossError, match=r"torch.rand|rand in 1\.1 \(Jitter\)"):
        hos.summarize(loss, params, params, hos.Partition.per_tensor(params))


def test_an_op_without_derivative_gets_a_clear_error():
    """torch.igamma has no derivative in its first argument, on any backend."""

    def loss(p):
        return torch.igamma(p["w"], torch.ones_like(p["w"])).sum() + (p["w"] ** 2).sum()

    params = {"w": torch.rand(5, generator=torch.Generator().manual_seed(5), dtype=DT) + 1}
    part = hos.Partition.per_tensor(params)
    for backend in BACKENDS:
        with pytest.raises(NotImplementedError, match=r"^hos: PyTorch cannot differentiate igamma"):
            hos.summarize(loss, params, params, part, backend=backend)


# --------------------------------------------------------------------------- certificate
@pytest.fixture
def broken_rule(monkeypatch):
    """Re-create the first version's bug: ``buffer.type_as(h)`` passes h's coefficients on."""
    _certificate.clear()
    monkeypatch.setattr("hos.taylor.engine.SELF_ONLY", set())
    yield
    _certificate.clear()


def _runner(call, loss, params, u, part):
    """The public call that takes each Taylor-mode path (keywords passed through)."""
    return {
        "summarize": lambda **kw: hos.summarize(loss, params, u, part, **kw),
        "summarize_rows": lambda **kw: hos.summarize(loss, params, u, part, chunk=2, **kw),
        "diagonal": lambda **kw: hos.summary_diagonal(loss, params, u, part, 3, **kw),
        "tensor": lambda **kw: hos.summary_tensor(loss, params, u, part, 3, **kw),
    }[call]


def _reference(construct_id):
    _, _, loss, params, u, part = _setup(construct_id)
    s = hos.summarize(loss, params, u, part, backend="reverse")
    return s


@pytest.mark.parametrize(
    "call",
    [
        "summarize",  # the one-pass summary (S <= 12): one gradient on first sight
        "summarize_rows",  # chunked: reverse rows, compared on every call
        "diagonal",  # summary_diagonal(order 3): one gradient on first sight
        "tensor",  # multivariate Taylor mode: one gradient on first sight
    ],
)
def test_certificate_catches_a_broken_rule(broken_rule, call):
    _, _, loss, params, u, part = _setup("type_as")
    expected = _reference("type_as")
    run = _runner(call, loss, params, u, part)

    def d3_of(out):
        if isinstance(out, hos.Summary):
            return out.d3
        return out if out.dim() == 1 else torch.einsum("iii->i", out)

    unchecked = run(verify=False)  # the broken rule really is wrong ...
    assert (d3_of(unchecked) - expected.d3).abs().max() > 1e-3 * expected.d3.abs().max()
    with pytest.warns(hos.TaylorModeWarning, match=r"type_as"):
        checked = run()  # ... and the certificate catches it
    fd.close(d3_of(checked), expected.d3, AGREE, f"{call} d3 after the certificate")
    if isinstance(checked, hos.Summary):
        fd.close(checked.g, expected.g, AGREE, f"{call} g")
        fd.close(checked.H, expected.H, AGREE, f"{call} H")
    record = hos.last_fallback()
    assert record is not None and record.certificate and "fc1.weight" in record.groups
    with warnings.catch_warnings():
        warnings.simplefilter("error", hos.TaylorModeWarning)  # warned once per op sequence
        again = run()
    fd.close(d3_of(again), expected.d3, AGREE, f"{call} d3, cached verdict")
    assert hos.last_fallback().certificate


def test_certificate_costs_reverse_passes_on_first_sight_only(monkeypatch):
    """First call of an op sequence: ḡ and H̄·1 by reverse mode (one graph, two backward
    passes); later calls: a cached verdict, no reverse pass at all."""
    _certificate.clear()
    _, _, loss, params, u, part = _setup("type_as")
    calls = []
    for name in ("reverse_diagonal", "gradient_and_row_sums"):
        original = getattr(certify, name)

        def counting(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(certify, name, counting)
    first = hos.summarize(loss, params, u, part)
    assert calls == ["gradient_and_row_sums"]
    second = hos.summarize(loss, params, u, part)
    assert len(calls) == 1, "the verdict for a seen op sequence is cached"
    hos.summarize(loss, params, u, part, verify=False)
    assert len(calls) == 1
    assert torch.equal(first.H, second.H) and hos.last_fallback() is None


def test_verify_must_be_a_bool():
    _, _, loss, params, u, part = _setup("type_as")
    with pytest.raises(TypeError, match=r"verify must be True or False, got 'yes'"):
        hos.summarize(loss, params, u, part, verify="yes")


# --------------------------------------------------------------------------- aliasing
def test_a_stale_view_after_an_inplace_write_falls_back_exactly():
    """A view taken before an in-place write sees the new values; its old coefficients
    are stale, so Taylor mode must not use them (it falls back, exactly)."""

    def loss(p):
        h = torch.tanh(p["a"]) * 1.0
        view = h[:, :2]  # a view with coefficients
        h.mul_(p["b"])  # h written in place: view changes too
        return (view * p["b"][:, :2]).sum() + (h**2).sum()

    gen = torch.Generator().manual_seed(3)
    params = {"a": torch.randn(3, 4, generator=gen, dtype=DT),
              "b": torch.randn(3, 4, generator=gen, dtype=DT)}  # fmt: skip
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    s = hos.summarize(loss, params, u, part)
    record = hos.last_fallback()
    assert record is not None and "in place" in " ".join(record.reasons)
    expected = fd.Path(loss, params, u, part)
    fd.close(s.g, expected.g(), RTOL["g"], "g")
    fd.close(s.d3, expected.diagonal(3), RTOL["d3"], "d3")


def test_a_constant_alias_that_an_inplace_write_made_move_falls_back_exactly():
    def loss(p):
        buf = torch.zeros(3, 4, dtype=DT)
        flat = buf.view(-1)  # a constant alias, taken before the write
        buf[:, 1] = torch.tanh(p["a"][:, 0])
        return (flat * flat).sum() + (p["a"] ** 3).sum()

    params = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=DT)}
    u = {"a": torch.ones(3, 4, dtype=DT)}
    part = hos.Partition.per_tensor(params)
    s = hos.summarize(loss, params, u, part)
    assert hos.last_fallback() is not None
    expected = fd.Path(loss, params, u, part)
    fd.close(s.g, expected.g(), RTOL["g"], "g")
    fd.close(s.d3, expected.diagonal(3), RTOL["d3"], "d3")


def test_no_forward_mode_rule_is_refused_by_forward_backends_and_followed_by_reverse():
    """grid_sample has no forward-mode derivative in PyTorch: the forward and reference
    backends say so in hos's words; Taylor mode falls back for it and matches reverse."""
    import torch.nn.functional as F

    grid = torch.rand(1, 3, 3, 2, generator=torch.Generator().manual_seed(6), dtype=DT) - 0.5

    def loss(p):
        image = torch.tanh(p["w"]).reshape(1, 1, 4, 4)
        return (F.grid_sample(image, grid, align_corners=False) ** 2).sum()

    params = {"w": torch.randn(16, generator=torch.Generator().manual_seed(7), dtype=DT)}
    u = {"w": torch.randn(16, generator=torch.Generator().manual_seed(8), dtype=DT)}
    part = hos.Partition.per_tensor(params)
    for backend in ("forward", "reference"):
        with pytest.raises(NotImplementedError, match=r"^hos: .*grid_sampler_2d.*'reverse'"):
            hos.summarize(loss, params, u, part, backend=backend)
    s = hos.summarize(loss, params, u, part)
    assert "grid_sample" in " ".join(hos.last_fallback().reasons)
    r = hos.summarize(loss, params, u, part, backend="reverse")
    fd.close(s.d3, r.d3, AGREE, "grid_sample d3")
    fd.close(s.g, fd.Path(loss, params, u, part).g(), RTOL["g"], "grid_sample g")


def test_public_names():
    for name in ("Fallback", "TaylorModeWarning", "last_fallback", "RandomLossError"):
        assert name in hos.__all__ and hasattr(hos, name)


@pytest.fixture
def broken_second_order(monkeypatch):
    """A wrong second derivative of tanh (first order right): only a second-order check sees it."""
    _certificate.clear()
    from hos.taylor import series

    original = series._tanh_derivatives

    def wrong(y, K):
        out = original(y, K)
        if K >= 2:
            out[1] = out[1] * 1.5
        return out

    monkeypatch.setattr(series, "_tanh_derivatives", wrong)
    yield
    _certificate.clear()


@pytest.mark.parametrize("call", ["summarize", "summarize_rows", "diagonal"])
def test_certificate_catches_a_broken_second_order_rule(broken_second_order, call):
    _, _, loss, params, u, part = _setup("type_as")
    expected = _reference("type_as")
    run = _runner(call, loss, params, u, part)

    def d3_of(out):
        return out.d3 if isinstance(out, hos.Summary) else out

    unchecked = run(verify=False)
    assert (d3_of(unchecked) - expected.d3).abs().max() > 1e-3 * expected.d3.abs().max()
    with pytest.warns(hos.TaylorModeWarning, match=r"H̄|second-order") as said:
        checked = run()
    # every op's first coefficient is right: no op can be singled out, and the message says
    # where the gap must be and at what scale of θ and u
    assert any(re.search(r"no op singled out.*higher-order terms.*largest \|θ\| [0-9.e+-]+, "
                         r"\|u\| [0-9.e+-]+", str(w.message)) for w in said), [str(w.message) for w in said]  # fmt: skip
    fd.close(d3_of(checked), expected.d3, AGREE, f"{call} d3 after the certificate")
    if isinstance(checked, hos.Summary):
        fd.close(checked.H, expected.H, AGREE, f"{call} H")
    assert hos.last_fallback().certificate


def test_loaders_pass_verify_through():
    from torch.utils.data import DataLoader, TensorDataset

    c, model, _, params, u, part = _setup("type_as")
    gen = torch.Generator().manual_seed(15)
    data = TensorDataset(torch.randn(6, 6, generator=gen, dtype=DT), torch.tensor([0, 1, 2] * 2))
    loader = DataLoader(data, batch_size=3)
    crit = nn.CrossEntropyLoss()
    checked = hos.summarize_loader(model, crit, loader, u, part, progress=False)
    unchecked = hos.summarize_loader(model, crit, loader, u, part, progress=False, verify=False)
    fd.close(unchecked.H, checked.H, AGREE, "loader H with and without the certificate")
    with pytest.raises(TypeError, match="verify must be True or False"):
        hos.summary_diagonal_loader(model, crit, loader, u, part, 3, progress=False, verify=1)

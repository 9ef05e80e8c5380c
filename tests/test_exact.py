"""ExactOps: why it exists (the trap), and that each decomposition computes its op.

1. Naive nested AD through ``nn.BatchNorm2d`` (train) and ``nn.LayerNorm`` is
   silently wrong in PyTorch 2.13, while hos (under ExactOps) matches the oracle.
2. Every entry of ``DECOMPOSITIONS`` gives the forward value of the op it
   replaces, on random inputs covering its options (masks, causal, GQA, ...).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

import hos
from hos._exact import DECOMPOSITIONS, ExactOps
from hos._refusals import (
    FORWARD_UNSOUND,
    NOT_DIFFERENTIABLE,
    RANDOM,
    NoDerivativeError,
    RandomLossError,
)
from tests.helpers.cases import build, oracle_diagonal, oracle_tensor
from tests.helpers.tolerances import DT, IDENTICAL, ROUNDOFF, assert_close, relative_error

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:size_average and reduce args:UserWarning"),
]

# --------------------------------------------------------------------------- the trap

#: EXPECTED PYTORCH BUG (measured on 2.13): higher derivatives through the fused
#: batch_norm / layer_norm kernels are wrong. The tests below assert that naive AD is
#: off by more than this. If they fail, PyTorch has fixed the kernels: update
#: DESIGN.md §2 and turn these assertions around (do not loosen the hos assertions).
NAIVE_ERROR_AT_LEAST = 1e-3

TRAP_CASES = ["conv-bn-ce-per_layer", "layernorm-mse-per_tensor"]


def _naive_loss(case, params):
    """The nn model's loss with plain functional_call: no ExactOps, buffers copied."""
    buffers = {k: v.clone() for k, v in case.model.named_buffers()}
    out = functional_call(case.model, (params, buffers), (case.inputs,))
    return case.criterion(out, case.targets)


def _naive_diagonal3(case):
    """d³/dt³ L(θ + t u_s) by three nested torch.autograd.grad calls, per group
    (a derivative that autograd reports as unused counts as zero, as allow_unused says)."""
    theta = {k: v.clone().requires_grad_(True) for k, v in case.params.items()}
    loss = _naive_loss(case, theta)
    out = []
    for group in case.partition.groups:
        leaves = [theta[n] for n in group]
        value = loss
        for depth in range(3):
            if not value.requires_grad:  # disconnected: every further derivative is 0
                value = torch.zeros((), dtype=DT)
                break
            grads = torch.autograd.grad(
                value, leaves, create_graph=depth < 2, retain_graph=True, allow_unused=True
            )
            value = torch.zeros((), dtype=DT) + sum(
                (g * case.direction[n]).sum() for n, g in zip(group, grads) if g is not None
            )
        out.append(value.detach())
    return torch.stack(out)


def _naive_hessian(case):
    """H̄ by torch.func.hessian of φ through the nn model."""
    owner = {n: s for s, g in enumerate(case.partition.groups) for n in g}

    def phi(eta):
        moved = {n: p + eta[owner[n]] * case.direction[n] for n, p in case.params.items()}
        return _naive_loss(case, moved)

    return hessian(phi)(torch.zeros(case.S, dtype=DT))


@pytest.mark.parametrize("case_id", TRAP_CASES)
def test_naive_third_derivative_is_wrong_but_hos_is_right(case_id):
    case = build(case_id)
    expected = oracle_diagonal(case_id, 3)
    naive_error = relative_error(_naive_diagonal3(case), expected)
    # EXPECTED PYTORCH BUG: see NAIVE_ERROR_AT_LEAST.
    assert naive_error > NAIVE_ERROR_AT_LEAST, (
        f"naive nested autograd is now right to {naive_error:.1e} through {case_id}: PyTorch "
        "seems to have fixed higher-order derivatives of fused norms; update DESIGN.md §2."
    )
    got = hos.summary_diagonal(case.loss, case.params, case.direction, case.partition, 3)
    assert_close(got, expected, f"hos diag D^(3) through {case_id}")


@pytest.mark.parametrize("case_id", TRAP_CASES)
def test_torch_func_hessian_is_wrong_but_hos_is_right(case_id):
    case = build(case_id)
    expected = oracle_tensor(case_id, 2)
    naive_error = relative_error(_naive_hessian(case), expected)
    # EXPECTED PYTORCH BUG: see NAIVE_ERROR_AT_LEAST.
    assert naive_error > NAIVE_ERROR_AT_LEAST, (
        f"torch.func.hessian is now right to {naive_error:.1e} through {case_id}: PyTorch "
        "seems to have fixed higher-order derivatives of fused norms; update DESIGN.md §2."
    )
    got = hos.summary_tensor(case.loss, case.params, case.direction, case.partition, 2)
    assert_close(got, expected, f"hos H̄ through {case_id}")


# --------------------------------------------------------------------------- decompositions


def _r(*shape, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=DT)
    return x.abs() + 0.5 if positive else x


def _bool_mask(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) > 0.4
    mask[..., 0] = True  # no fully masked row
    return mask


x4 = _r(4, 3, 5, 2, seed=1)
q, k, v = _r(2, 4, 3, 5, seed=2), _r(2, 4, 6, 5, seed=3), _r(2, 4, 6, 5, seed=4)
k2, v2 = _r(2, 2, 6, 5, seed=5), _r(2, 2, 6, 5, seed=6)
qs, ks, vs = _r(2, 4, 6, 5, seed=7), _r(2, 4, 6, 5, seed=8), _r(2, 4, 6, 5, seed=9)
stats = (_r(3, seed=10), _r(3, seed=11, positive=True))
w3, b3 = _r(3, seed=12), _r(3, seed=13)

#: (args, kwargs) per decomposed function; every DECOMPOSITIONS key must appear.
INPUTS = {
    F.batch_norm: [
        ((x4, *stats, w3, b3), {"training": True}),
        ((x4, *stats, w3, b3), {"training": False}),
        ((_r(5, 3, seed=14), *stats), {"training": True, "eps": 1e-3}),
        ((x4, None, None), {"training": True}),
    ],
    F.instance_norm: [
        ((x4,), {}),
        ((x4, None, None, w3, b3), {"use_input_stats": True}),
        ((x4, *stats), {"use_input_stats": False}),
    ],
    F.layer_norm: [
        ((x4, (5, 2), _r(5, 2, seed=15), _r(5, 2, seed=16)), {}),
        ((x4, (2,)), {"eps": 1e-2}),
    ],
    F.group_norm: [
        ((_r(2, 6, 3, 2, seed=17), 3, _r(6, seed=18), _r(6, seed=19)), {}),
        ((_r(2, 4, 5, seed=20), 2), {"eps": 1e-3}),
        ((_r(2, 4, 5, seed=21), 1), {}),
    ],
    F.rms_norm: [
        ((x4, (2,), _r(2, seed=22)), {}),
        ((x4, (5, 2)), {"eps": 1e-3}),
    ],
    F.scaled_dot_product_attention: [
        ((q, k, v), {}),
        ((q, k, v), {"attn_mask": _bool_mask(3, 6, seed=23)}),
        ((q, k, v), {"attn_mask": _r(2, 4, 3, 6, seed=24)}),
        ((q, k, v), {"attn_mask": _r(3, 6, seed=25), "scale": 0.3}),
        ((qs, ks, vs), {"is_causal": True}),
        ((q, k, v), {"is_causal": True}),
        ((q, k2, v2), {"enable_gqa": True}),
        ((qs, k2, v2), {"enable_gqa": True, "is_causal": True, "scale": 2.0}),
    ],
    F.mse_loss: [
        ((x4, _r(4, 3, 5, 2, seed=26)), {}),
        ((x4, _r(4, 3, 5, 2, seed=26)), {"reduction": "sum"}),
        ((x4, _r(4, 3, 5, 2, seed=26)), {"reduction": "none"}),
        ((x4, _r(4, 3, 5, 2, seed=26)), {"weight": _r(4, 3, 5, 2, seed=27, positive=True)}),
        ((x4, _r(4, 3, 5, 2, seed=26)), {"size_average": False}),
    ],
    F.huber_loss: [
        ((3 * x4, _r(4, 3, 5, 2, seed=28)), {}),
        ((3 * x4, _r(4, 3, 5, 2, seed=28)), {"reduction": "sum", "delta": 0.5}),
        ((3 * x4, _r(4, 3, 5, 2, seed=28)), {"reduction": "none", "delta": 2.0}),
        ((3 * x4, _r(4, 3, 5, 2, seed=28)), {"weight": _r(4, 3, 5, 2, seed=29, positive=True)}),
    ],
    torch._weight_norm: [
        ((_r(4, 3, 2, seed=40), _r(4, 1, 1, seed=41, positive=True), 0), {}),
        ((_r(4, 3, 2, seed=40), _r(1, 3, 1, seed=42, positive=True), 1), {}),
        ((_r(4, 3, seed=40), _r(seed=43, positive=True).reshape(()), -1), {}),
    ],
    torch.cdist: [
        ((_r(5, 3, seed=44), _r(4, 3, seed=45)), {}),
        ((_r(2, 5, 3, seed=44), _r(2, 4, 3, seed=45)), {"p": 1.0}),
        ((_r(5, 3, seed=44), _r(4, 3, seed=45)), {"p": 3.0}),
        ((_r(5, 3, seed=44), _r(4, 3, seed=45)), {"p": float("inf")}),
        ((_r(5, 3, seed=44), _r(4, 3, seed=45)), {"p": 0.0}),
    ],
    F.pdist: [((_r(5, 3, seed=46),), {}), ((_r(5, 3, seed=46),), {"p": 1.5})],
    F.multi_margin_loss: [
        ((_r(6, 4, seed=47), torch.tensor([0, 3, 1, 2, 2, 0])), {}),
        ((_r(6, 4, seed=47), torch.tensor([0, 3, 1, 2, 2, 0])), {"p": 2, "margin": 0.7}),
        (
            (_r(6, 4, seed=47), torch.tensor([0, 3, 1, 2, 2, 0])),
            {"weight": _r(4, seed=48, positive=True), "reduction": "none"},
        ),
        ((_r(4, seed=47), torch.tensor(2)), {"reduction": "sum"}),
    ],
    F.soft_margin_loss: [
        ((_r(6, 4, seed=49), torch.sign(_r(6, 4, seed=50))), {}),
        ((_r(6, 4, seed=49), torch.sign(_r(6, 4, seed=50))), {"reduction": "none"}),
    ],
    F.glu: [((_r(4, 6, seed=51),), {}), ((_r(4, 6, 2, seed=51),), {"dim": 1})],
    F.mish: [((_r(4, 6, seed=56),), {})],
    F.hardsigmoid: [((4 * _r(4, 6, seed=57),), {})],
    F.hardswish: [((4 * _r(4, 6, seed=58),), {})],
    F.binary_cross_entropy_with_logits: [
        (
            (
                _r(4, 3, seed=59),
                torch.rand(4, 3, generator=torch.Generator().manual_seed(60), dtype=DT),
            ),
            {},
        ),  # fmt: skip
        (
            (
                _r(4, 3, seed=59),
                torch.rand(4, 3, generator=torch.Generator().manual_seed(60), dtype=DT),
            ),  # fmt: skip
            {
                "pos_weight": _r(3, seed=61, positive=True),
                "weight": _r(3, seed=62),
                "reduction": "sum",
            },  # fmt: skip
        ),
    ],
    torch.linalg.vector_norm: [
        ((_r(4, 3, seed=63),), {}),
        ((_r(4, 3, seed=63), 1), {"dim": 1, "keepdim": True}),
        ((_r(4, 3, seed=63), float("inf")), {"dim": 0}),
        ((_r(4, 3, seed=63), 3.5), {"dim": (0, 1)}),
        ((_r(4, 3, seed=63), 0), {}),
    ],
    torch.logaddexp: [((_r(4, 3, seed=64), 30 * _r(4, 3, seed=65)), {})],
    F.embedding: [
        ((torch.tensor([[0, 2], [3, 0]]), _r(4, 3, seed=52)), {"padding_idx": 0}),
        ((torch.tensor([1, 2]), _r(4, 3, seed=52)), {}),
    ],
    F.normalize: [((_r(4, 3, seed=53),), {}), ((_r(4, 3, seed=53),), {"dim": 0, "p": 1.0})],
}
# Dropout of every kind: the identity, i.e. the op in eval mode (training=False).
for _f, _shape in [
    (F.dropout, (4, 3)),
    (F.dropout1d, (4, 3, 5)),
    (F.dropout2d, (4, 3, 5, 2)),
    (F.dropout3d, (4, 3, 5, 2, 2)),
    (F.alpha_dropout, (4, 3)),
    (F.feature_alpha_dropout, (4, 3, 5)),
]:
    INPUTS[_f] = [((_r(*_shape, seed=30),), {"p": 0.5, "training": True})]

FAST_PATHS = {
    getattr(torch, name)
    for name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd")
    if hasattr(torch, name)
}
DROPOUTS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}


def _key(func):
    return getattr(func, "__name__", repr(func))


def _as_list(out):
    return list(out) if isinstance(out, tuple) else [out]


#: Guarded, not replaced: refused when their input moves (test_guarded_ops_...).
GUARDED = set(NOT_DIFFERENTIABLE) | set(FORWARD_UNSOUND)

#: The recurrent kernels are checked through their modules (test_recurrent_dropout_...).
RECURRENT = {getattr(torch._VF, name) for name in ("lstm", "gru", "rnn_tanh", "rnn_relu")}


def test_every_decomposition_has_inputs():
    covered = set(INPUTS) | FAST_PATHS | RECURRENT | set(RANDOM) | GUARDED
    covered |= {F.multi_head_attention_forward}
    missing = [_key(f) for f in DECOMPOSITIONS if f not in covered]
    assert not missing, f"add inputs to tests/test_exact.py::INPUTS for {missing}"


@pytest.mark.parametrize(
    "func, args, kwargs",
    [
        pytest.param(f, a, kw, id=f"{_key(f)}-{i}")
        for f, calls in INPUTS.items()
        for i, (a, kw) in enumerate(calls)
    ],
)
def test_decomposition_matches_op(func, args, kwargs):
    clone = [a.clone() if torch.is_tensor(a) else a for a in args]
    if func in DROPOUTS:
        expected = func(*clone, **{**kwargs, "training": False})
    else:
        expected = func(*clone, **kwargs)
    fresh = [a.clone() if torch.is_tensor(a) else a for a in args]
    with ExactOps():
        got = func(*fresh, **kwargs)
    for e, g in zip(_as_list(expected), _as_list(got)):
        assert_close(g, e, f"{_key(func)} {kwargs}", **ROUNDOFF)
    for before, after in zip(args, fresh):  # the decomposition writes to no input
        if torch.is_tensor(before):
            assert torch.equal(before, after), f"{_key(func)} modified an input in place"


@pytest.mark.parametrize(
    "kwargs, call",
    [
        ({}, {}),
        ({}, {"need_weights": False}),
        ({}, {"average_attn_weights": False}),
        ({"bias": False, "add_bias_kv": True, "add_zero_attn": True}, {}),
        ({"kdim": 3, "vdim": 2}, {"cross": True}),
        ({}, {"causal": True}),
        ({}, {"key_padding": True, "need_weights": False}),
        ({"dropout": 0.5}, {}),
    ],
)
@pytest.mark.parametrize("batch_first", [True, False])
def test_multi_head_attention_decomposition_matches_module(kwargs, call, batch_first):
    """nn.MultiheadAttention (train mode) through the explicit-softmax branch under ExactOps.

    With dropout > 0 the exact path is compared with the module in eval mode, since
    dropout is the identity during summaries."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, **kwargs).to(DT)
    call = dict(call)
    shape = (2, 5, 4) if batch_first else (5, 2, 4)
    x = _r(*shape, seed=31)
    key = value = x
    if call.pop("cross", False):
        kv_shape = (2, 6) if batch_first else (6, 2)
        key, value = _r(*kv_shape, 3, seed=32), _r(*kv_shape, 2, seed=33)
    if call.pop("causal", False):
        call["attn_mask"] = ~torch.ones(5, 5, dtype=torch.bool).tril()
    if call.pop("key_padding", False):
        pad = torch.zeros(2, 5, dtype=torch.bool)
        pad[0, -2:] = True
        call["key_padding_mask"] = pad
    mha.train(kwargs.get("dropout", 0.0) == 0.0)
    expected = mha(x, key, value, **call)
    mha.train()
    with ExactOps():
        got = mha(x, key, value, **call)
    assert mha.training
    for e, g in zip(expected, got):
        assert (e is None) == (g is None)
        if e is not None:
            assert_close(g, e, f"MultiheadAttention {kwargs} {call}", **ROUNDOFF)


@pytest.mark.parametrize("need_weights", [False, True])
def test_attention_weights_nobody_asked_for_are_not_averaged(need_weights, monkeypatch):
    """The explicit-softmax branch returns the weights; averaging them over the heads is work
    only a caller who asked for them should pay (on Taylor coefficients it is T×T adds per
    head and order): no `mean` over the heads without `need_weights`, the same output."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, batch_first=True).to(DT)
    x = _r(2, 5, 4, seed=35)
    expected = mha(x, x, x, need_weights=need_weights)
    means, mean = [], torch.Tensor.mean

    def spy(self, *args, **kwargs):
        means.append(tuple(self.shape))
        return mean(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "mean", spy)
    with ExactOps():
        got = mha(x, x, x, need_weights=need_weights)
    assert_close(got[0], expected[0], "MultiheadAttention", **ROUNDOFF)
    assert (got[1] is None) == (not need_weights)
    assert bool(means) == need_weights, means


def test_transformer_layer_in_eval_mode_skips_the_fast_path():
    """Under ExactOps the inference fast path is never taken; values match the fast path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, batch_first=True).to(DT)
    layer.eval()
    x = _r(2, 3, 4, seed=34)
    with torch.no_grad():
        expected = layer(x)
        with ExactOps():
            got = layer(x)
    assert_close(got, expected, "TransformerEncoderLayer eval", **ROUNDOFF)


@pytest.mark.parametrize("func", sorted(FAST_PATHS, key=_key), ids=_key)
def test_fast_path_kernels_are_refused(func):
    t = torch.zeros(1, dtype=DT)
    if func.__name__ == "_native_multi_head_attention":
        args = (t, t, t, 4, 2, t, t, t, t)
    else:
        args = (t, 4, 2, t, t, t, t, False, False, 1e-5, t, t, t, t, t, t, t, t)
    with ExactOps(), pytest.raises(RuntimeError, match="fast path"):
        func(*args)


def test_batch_norm_decomposition_refuses_a_single_value_per_channel():
    """As F.batch_norm does: batch statistics of one sample would silently normalise to 0."""
    x = _r(1, 3, seed=35)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(x, None, None, training=True)
    with ExactOps(), pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(x, None, None, training=True)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh", "RNN-relu"])
def test_recurrent_dropout_is_off_during_summaries(kind):
    """Dropout between recurrent layers draws a new mask at every call in train mode;
    under ExactOps the train-mode module gives the eval-mode values, every time."""
    torch.manual_seed(0)
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(kind, nn.RNN)
    extra = {"nonlinearity": kind.split("-")[1]} if kind.startswith("RNN") else {}
    rnn = cls(3, 4, num_layers=3, dropout=0.5, **extra).to(DT)
    x = _r(5, 2, 3, seed=54)
    rnn.eval()
    expected = rnn(x)[0]
    rnn.train()
    with ExactOps():
        first, second = rnn(x)[0], rnn(x)[0]
    assert rnn.training
    assert_close(first, expected, f"{kind} train-mode under ExactOps", **ROUNDOFF)
    assert torch.equal(first, second)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    rnn.eval()
    expected = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0])[0]
    rnn.train()
    with ExactOps():
        got = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0])[0]
    assert_close(got, expected, f"packed {kind} under ExactOps", **ROUNDOFF)


def test_spectral_norm_power_iteration_is_held_during_summaries():
    """Under ExactOps a train-mode spectral-norm layer uses its current vectors (as in
    eval mode) and never writes its buffers."""
    torch.manual_seed(0)
    layer = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3)).to(DT)
    x = _r(5, 4, seed=55)
    layer.eval()
    expected = layer(x)
    layer.train()
    before = {k: b.clone() for k, b in layer.named_buffers()}
    with ExactOps():
        got = layer(x)
    assert_close(got, expected, "spectral_norm train mode under ExactOps", **ROUNDOFF)
    for k, b in layer.named_buffers():
        assert torch.equal(b, before[k]), f"buffer {k} written"


def test_embedding_max_norm_is_refused():
    emb = nn.Embedding(4, 3, max_norm=1.0).to(DT)
    with ExactOps(), pytest.raises(ValueError, match="max_norm"):
        emb(torch.tensor([1, 2]))


def _random_call(func):
    t, p = torch.zeros(3, dtype=DT), torch.full((3,), 0.5, dtype=DT)
    name = func.__name__
    calls = {
        "rand": lambda: func(3),
        "randn": lambda: func(3),
        "randint": lambda: func(0, 4, (3,)),
        "randperm": lambda: func(3),
        "normal": lambda: func(t, p + 1),
        "multinomial": lambda: func(p, 1),
        "bernoulli": lambda: func(p),
        "poisson": lambda: func(p),
        "rrelu": lambda: func(t, training=True),
        "rrelu_": lambda: func(t.clone(), training=True),
        "randint_like": lambda: func(t, 4),
        "geometric_": lambda: func(p.clone(), 0.5),
    }
    return calls.get(name, lambda: func(p.clone()))


@pytest.mark.parametrize("func", RANDOM, ids=_key)
def test_random_sampling_is_refused(func):
    """Randomness in the loss has no derivatives: every sampler is refused under ExactOps."""
    call = _random_call(func)
    call()  # a valid call outside ExactOps
    with ExactOps(), pytest.raises(RandomLossError, match="samples random numbers"):
        call()


@pytest.mark.parametrize("func", NOT_DIFFERENTIABLE, ids=_key)
def test_guarded_ops_refuse_a_moving_input(func):
    """Smooth ops PyTorch declares non-differentiable: values unchanged on constants, an
    error when autograd would silently take a moving input for a constant."""
    x = _r(5, seed=66, positive=True)
    args = (x,) if "polynomial" not in func.__name__ else (x, 3)
    expected = func(*args)
    with ExactOps():
        assert_close(func(*args), expected, func.__name__, **IDENTICAL)
        moving = (x.clone().requires_grad_(),) + args[1:]
        with pytest.raises(NoDerivativeError, match="has no derivative in PyTorch"):
            func(*moving)


@pytest.mark.parametrize("func", FORWARD_UNSOUND, ids=_key)
def test_forward_unsound_ops_are_refused_under_torch_func_only(func):
    a = torch.eye(3, dtype=DT) * 2 + 0.1 * _r(3, 3, seed=67)
    args = {"solve": (a, _r(3, seed=68)), "solve_ex": (a, _r(3, seed=68)),
            "tensorsolve": (a, _r(3, seed=68)),
            "householder_product": (_r(3, 2, seed=69), _r(2, seed=70))}.get(
        func.__name__.removeprefix("linalg_"), (a,))  # fmt: skip
    expected = func(*args)
    with ExactOps():
        got = func(*args)  # plain inputs, and inputs that require grad: reverse mode is right
        func(args[0].clone().requires_grad_(), *args[1:])
        with pytest.raises(NoDerivativeError, match="wrong forward-mode derivatives"):
            torch.func.jvp(lambda m: func(m, *args[1:]), (args[0],), (torch.ones_like(args[0]),))
    for e, g in zip(_as_list(expected), _as_list(got)):
        assert_close(g, e, func.__name__, **IDENTICAL)

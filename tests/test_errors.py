"""Bad inputs to every public entry point: the exception type and a message that names
the argument, shows the value and says what to do.

One table (:data:`ROWS`); each row is ``(id, call, exception, regex)`` where ``call``
is a zero-argument function that makes the bad call. Argument rows that apply to
every summary entry point are crossed with :data:`ENTRY_POINTS`.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import hos
from hos import reference

F64 = torch.float64

#: Words that introduce the remedy; every message must contain one of them.
ADVICE = re.compile(
    r"\b(use|pass|give|convert|move|build|check|restore|return|reduce|add|make|put|skip|"
    r"do not|unfreeze|materialise|leave|name|needs)\b|\be\.g\.|must be one of|must be None|must be True, False or None|the paper uses",
    re.IGNORECASE,
)


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, generator=g, dtype=F64),
        "b": torch.randn(1, generator=g, dtype=F64),
    }


def _direction() -> dict[str, torch.Tensor]:
    return {k: torch.ones_like(v) for k, v in _params().items()}


def _loss(p):
    return (p["w"] ** 3).sum() + p["w"].sum() * p["b"].sum()


def _part() -> hos.Partition:
    return hos.Partition.per_tensor(_params())


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))


def _frozen_net() -> nn.Module:
    net = _net()
    net[0].requires_grad_(False)
    return net


def _with(d, key, value):
    return {**d, key: value}


def _nan(d, key, value=float("nan")):
    t = d[key].clone()
    t.view(-1)[0] = value
    return _with(d, key, t)


# ----------------------------------------------------------------------- entry points
def _args(kw, order):
    """Good arguments, overridden by ``kw`` (which may set any of them to a bad value)."""
    full = {"loss": _loss, "params": _params(), "direction": _direction(), "partition": _part()}
    if order is not None:
        full["order"] = order
    full.update(kw)
    return full


def _tensor(**kw):
    return hos.summary_tensor(**_args(kw, 2))


def _diagonal(**kw):
    return hos.summary_diagonal(**_args(kw, 3))


def _summarize(**kw):
    return hos.summarize(**_args(kw, None))


def _ref_tensor(**kw):
    return reference.summary_tensor(**_args(kw, 2))


def _ref_diagonal(**kw):
    return reference.summary_diagonal(**_args(kw, 2))


def _ref_phi(**kw):
    phi = reference.path_function(**_args(kw, None))
    return phi(torch.zeros(len(_part()), dtype=F64))


ENTRY_POINTS = {
    "summary_tensor": _tensor,
    "summary_diagonal": _diagonal,
    "summarize": _summarize,
    "reference.summary_tensor": _ref_tensor,
    "reference.summary_diagonal": _ref_diagonal,
    "reference.path_function": _ref_phi,
}
WITH_ORDER = ("summary_tensor", "summary_diagonal", "reference.summary_tensor")
WITH_BACKEND = ("summary_tensor", "summary_diagonal", "summarize")

# ----------------------------------------------------------------------- argument rows
P, U = _params(), _direction()
MISSING_U = {"w": U["w"]}
EXTRA_U = {**U, "c": torch.zeros(2, dtype=F64)}
META_U = _with(U, "w", torch.empty(3, dtype=F64, device="meta"))


def _constant(p):
    return torch.tensor(1.0, dtype=F64)


def _detached(p):
    return (p["w"].detach() ** 2).sum()


def _no_grad(p):
    with torch.no_grad():
        return (p["w"] ** 2).sum()


#: (id, keyword arguments for an entry point, exception, message regex)
ARGUMENT_ROWS = [
    # params
    ("params-list", {"params": [P["w"]]}, TypeError, r"params must be a non-empty dict.*\[tensor"),
    ("params-empty", {"params": {}}, TypeError, r"params must be a non-empty dict.*\{\}"),
    (
        "params-float",
        {"params": _with(P, "w", 1.5)},
        TypeError,
        r"params\['w'\] is a float \(1\.5\)",
    ),
    (
        "params-int",
        {"params": _with(P, "w", torch.ones(3, dtype=torch.int64))},
        TypeError,
        r"params\['w'\] has dtype torch\.int64.*floating",
    ),
    (
        "params-complex",
        {"params": _with(P, "w", torch.ones(3, dtype=torch.complex128))},
        TypeError,
        r"params\['w'\] has dtype torch\.complex128",
    ),
    (
        "params-nan",
        {"params": _nan(P, "w")},
        ValueError,
        r"params\['w'\] has 1 NaN/Inf entries \(of 3\)",
    ),
    (
        "params-inf",
        {"params": _nan(P, "b", float("inf"))},
        ValueError,
        r"params\['b'\] has 1 NaN/Inf entries \(of 1\)",
    ),
    (
        "params-meta",
        {"params": _with(P, "w", torch.empty(3, dtype=F64, device="meta"))},
        ValueError,
        r"params\['w'\] is on the meta device",
    ),
    # direction
    ("direction-none", {"direction": None}, TypeError, r"direction must be a dict.*None"),
    (
        "direction-missing",
        {"direction": MISSING_U},
        ValueError,
        r"direction keys .*missing \['b'\]",
    ),
    ("direction-extra", {"direction": EXTRA_U}, ValueError, r"direction keys .*unexpected \['c'\]"),
    (
        "direction-shape",
        {"direction": _with(U, "w", torch.ones(3, 1, dtype=F64))},
        ValueError,
        r"direction\['w'\] has shape \(3, 1\) but params\['w'\] has shape \(3,\)",
    ),
    (
        "direction-dtype",
        {"direction": _with(U, "w", torch.ones(3))},
        TypeError,
        r"direction\['w'\] has dtype torch\.float32 but params\['w'\] has torch\.float64",
    ),
    ("direction-device", {"direction": META_U}, ValueError, r"direction\['w'\] is on meta .*cpu"),
    (
        "direction-list",
        {"direction": _with(U, "w", [1.0, 1.0, 1.0])},
        TypeError,
        r"direction\['w'\] is a list \(\[1\.0",
    ),
    ("direction-nan", {"direction": _nan(U, "w")}, ValueError, r"direction\['w'\] has 1 NaN/Inf"),
    # partition
    (
        "partition-dict",
        {"partition": {"a": ["w"]}},
        TypeError,
        r"partition must be a hos\.Partition.*'a'",
    ),
    (
        "partition-misses",
        {"partition": hos.Partition(("a",), (("w",),))},
        ValueError,
        r"partition does not match params: params has \['b'\] that no group holds",
    ),
    (
        "partition-extra",
        {"partition": hos.Partition(("a", "b", "c"), (("w",), ("b",), ("v",)))},
        ValueError,
        r"partition names \['v'\] that params lacks",
    ),
    (
        "partition-frozen",
        {
            "loss": hos.model_loss(
                _frozen_net(), nn.MSELoss(), torch.ones(4, 2), torch.zeros(4, 1)
            ),
            "params": dict(_frozen_net().named_parameters()),
            "direction": {k: torch.ones_like(v) for k, v in _frozen_net().named_parameters()},
            "partition": hos.Partition.per_tensor(_frozen_net()),
        },
        ValueError,
        r"params has \['0\.weight', '0\.bias'\] that no group holds.*requires_grad",
    ),
    # loss
    ("loss-tensor", {"loss": torch.ones(())}, TypeError, r"loss must be a callable.*tensor\(1\.\)"),
    ("loss-none", {"loss": None}, TypeError, r"loss must be a callable.*None"),
    (
        "loss-vector",
        {"loss": lambda p: p["w"] ** 2},
        ValueError,
        r"loss must return a scalar.*\(3,\)",
    ),
    ("loss-float", {"loss": lambda p: 1.0}, TypeError, r"loss returned a float \(1\.0\)"),
    (
        "loss-item",
        {"loss": lambda p: (p["w"] ** 2).sum().item()},
        TypeError,
        r"loss returned a float .*\.item\(\)",
    ),
    (
        "loss-int-tensor",
        {"loss": lambda p: (p["w"] > 0).sum()},
        TypeError,
        r"loss returned a tensor of dtype torch\.int64",
    ),
    (
        "loss-constant",
        {"loss": _constant},
        ValueError,
        r"loss does not depend on the parameters.*tensor\(1\.",
    ),
    ("loss-detached", {"loss": _detached}, ValueError, r"loss does not depend on the parameters"),
    ("loss-no-grad", {"loss": _no_grad}, ValueError, r"loss does not depend.*torch\.no_grad"),
]

ORDER_ROWS = [
    ("order-0", {"order": 0}, ValueError, r"order must be >= 1, got 0"),
    ("order-negative", {"order": -2}, ValueError, r"order must be >= 1, got -2"),
    ("order-float", {"order": 2.0}, TypeError, r"order must be an int >= 1, got float 2\.0"),
    ("order-bool", {"order": True}, TypeError, r"order must be an int >= 1, got the bool True"),
    ("order-str", {"order": "3"}, TypeError, r"order must be an int >= 1, got str '3'"),
    ("order-none", {"order": None}, TypeError, r"order must be an int >= 1, got NoneType None"),
]

BACKEND_ROWS = [
    ("backend-unknown", {"backend": "fast"}, ValueError, r"backend must be one of .*got 'fast'"),
    ("backend-none", {"backend": None}, ValueError, r"backend must be one of .*got None"),
]

#: ``chunk`` (groups per Taylor-mode pass) of summarize and summary_diagonal.
CHUNK_ROWS = [
    ("chunk-0", {"chunk": 0}, ValueError, r"chunk must be None or an int >= 1.*got int 0"),
    ("chunk-float", {"chunk": 2.5}, ValueError, r"chunk must be None or an int >= 1.*float 2\.5"),
    ("chunk-bool", {"chunk": True}, ValueError, r"chunk must be None or an int >= 1.*bool True"),
    (
        "chunk-with-reverse",
        {"chunk": 2, "backend": "reverse"},
        ValueError,
        r"chunk=2 applies to Taylor mode only, but backend is 'reverse'",
    ),
    (
        "chunk-with-reference",
        {"chunk": 1, "backend": "reference"},
        ValueError,
        r"chunk=1 applies to Taylor mode only, but backend is 'reference'",
    ),
]

#: φ itself is not differentiated, so a loss that ignores θ is not an error there.
_NEEDS_DERIVATIVE = ("loss-constant", "loss-detached", "loss-no-grad")


def _big_problem(S: int):
    params = {f"p{i}": torch.zeros(1, dtype=F64) for i in range(S)}
    return (
        params,
        {k: torch.ones_like(v) for k, v in params.items()},
        hos.Partition.per_tensor(params),
    )


def _memory(fn, S, order, **kw):
    params, u, part = _big_problem(S)
    return lambda: fn(lambda p: sum(v.sum() for v in p.values()), params, u, part, order, **kw)


def _memory_reference():
    # reference batches all S**order derivatives of P = 50 001 parameter scalars at once.
    params = {
        "big": torch.zeros(50_000, dtype=F64),
        **{f"p{i}": torch.zeros(1, dtype=F64) for i in range(24)},
    }
    u = {k: torch.ones_like(v) for k, v in params.items()}
    part = hos.Partition.per_tensor(params)
    return lambda: hos.summary_tensor(
        lambda p: p["big"].sum(), params, u, part, 5, backend="reference"
    )


def _rows():
    rows = []
    for name, fn in ENTRY_POINTS.items():
        for rid, kwargs, exc, regex in ARGUMENT_ROWS:
            if name == "reference.path_function" and rid in _NEEDS_DERIVATIVE:
                continue
            rows.append((f"{name}:{rid}", fn, kwargs, exc, regex))
        if name in WITH_ORDER:
            for rid, kwargs, exc, regex in ORDER_ROWS:
                rows.append((f"{name}:{rid}", fn, kwargs, exc, regex))
        if name in WITH_BACKEND:
            for rid, kwargs, exc, regex in BACKEND_ROWS:
                rows.append((f"{name}:{rid}", fn, kwargs, exc, regex))
    for name in ("summary_diagonal", "summarize"):
        for rid, kwargs, exc, regex in CHUNK_ROWS:
            rows.append((f"{name}:{rid}", ENTRY_POINTS[name], kwargs, exc, regex))
    for backend in ("forward", "reverse", "reference"):
        for rid in ("loss-constant", "loss-no-grad"):
            _, kwargs, exc, regex = next(r for r in ARGUMENT_ROWS if r[0] == rid)
            for name in WITH_BACKEND:
                rows.append(
                    (
                        f"{name}:{rid}:{backend}",
                        ENTRY_POINTS[name],
                        {**kwargs, "backend": backend},
                        exc,
                        regex,
                    )
                )
    return rows


def _call(fn, kwargs):
    return lambda: fn(**kwargs)


#: (id, zero-argument call, exception, regex) for constructors and one-off entry points.
SINGLE_ROWS = [
    # Partition construction
    (
        "Partition-names-vs-groups",
        lambda: hos.Partition(("a", "b"), (("w",),)),
        ValueError,
        r"2 names but 1 groups",
    ),
    ("Partition-no-groups", lambda: hos.Partition((), ()), ValueError, r"no groups.*S >= 1"),
    (
        "Partition-empty-group",
        lambda: hos.Partition(("a", "b"), (("w",), ())),
        ValueError,
        r"group 'b' is empty",
    ),
    (
        "Partition-repeated-parameter",
        lambda: hos.Partition(("a", "b"), (("w",), ("w", "b"))),
        ValueError,
        r"parameter 'w' is in both group 'a' and group 'b'",
    ),
    (
        "Partition-duplicate-names",
        lambda: hos.Partition(("a", "a"), (("w",), ("b",))),
        ValueError,
        r"duplicate group names \['a'\]",
    ),
    (
        "Partition-name-not-str",
        lambda: hos.Partition((1,), (("w",),)),
        ValueError,
        r"non-empty strings, got 1",
    ),
    (
        "Partition-member-not-str",
        lambda: hos.Partition(("a",), ((3,),)),
        TypeError,
        r"group 'a' holds 3",
    ),
    (
        "Partition-names-str",
        lambda: hos.Partition("ab", (("w",), ("b",))),
        TypeError,
        r"names is the string 'ab'",
    ),
    (
        "Partition-group-str",
        lambda: hos.Partition(("a", "b"), ("w1", "b")),
        TypeError,
        r"a group is the string 'w1'",
    ),
    (
        "per_tensor-int",
        lambda: hos.Partition.per_tensor(42),
        TypeError,
        r"model must be an nn\.Module or a dict.*int: 42",
    ),
    (
        "per_layer-list",
        lambda: hos.Partition.per_layer([1]),
        TypeError,
        r"model must be an nn\.Module or a dict.*list",
    ),
    (
        "whole-none",
        lambda: hos.Partition.whole(None),
        TypeError,
        r"model must be an nn\.Module.*None",
    ),
    (
        "per_tensor-dict-float",
        lambda: hos.Partition.per_tensor({"w": 3.0}),
        TypeError,
        r"model\['w'\] is a float",
    ),
    (
        "per_tensor-frozen",
        lambda: hos.Partition.per_tensor(_net().requires_grad_(False)),
        ValueError,
        r"per_tensor: model has no parameter that requires grad.*unfreeze",
    ),
    (
        "per_layer-frozen",
        lambda: hos.Partition.per_layer(_net().requires_grad_(False)),
        ValueError,
        r"per_layer: model has no parameter that requires grad",
    ),
    (
        "whole-frozen",
        lambda: hos.Partition.whole(_net().requires_grad_(False)),
        ValueError,
        r"whole: model has no parameter",
    ),
    (
        "from_groups-str-globs",
        lambda: hos.Partition.from_groups(_net(), {"g": "*"}),
        TypeError,
        r"groups\['g'\] is the string '\*'",
    ),
    (
        "from_groups-empty",
        lambda: hos.Partition.from_groups(_net(), {}),
        TypeError,
        r"groups must be a non-empty dict.*\{\}",
    ),
    (
        "from_groups-misses",
        lambda: hos.Partition.from_groups(_net(), {"first": ["0.*"]}),
        ValueError,
        r"parameters \['2\.weight', '2\.bias'\] match no group",
    ),
    (
        "from_groups-overlap",
        lambda: hos.Partition.from_groups(_net(), {"a": ["0.*"], "b": ["*"]}),
        ValueError,
        r"parameter '0\.weight' matches both 'a' and 'b'",
    ),
    (
        "from_groups-empty-group",
        lambda: hos.Partition.from_groups(_net(), {"a": ["*"], "b": ["nothing*"]}),
        ValueError,
        r"\['b'\] match no parameter",
    ),
    (
        "group_of-unknown",
        lambda: _part().group_of("v"),
        KeyError,
        r"parameter 'v' is in no group.*\['w', 'b'\]",
    ),
    # model_loss
    (
        "model_loss-model",
        lambda: hos.model_loss(lambda x: x, nn.MSELoss(), 1, 1),
        TypeError,
        r"model must be an nn\.Module, got function",
    ),
    (
        "model_loss-criterion",
        lambda: hos.model_loss(_net(), "mse", 1, 1),
        TypeError,
        r"criterion must be callable.*'mse'",
    ),
    # memory: a clear error with the estimate before any work
    (
        "summary_tensor-memory",
        _memory(hos.summary_tensor, 200, 5),
        hos.SummaryMemoryError,
        r"order=5 with S=200 groups has S\*\*order = 3\.2e\+11 entries.*TiB.*summary_diagonal",
    ),
    (
        "reference-memory",
        _memory(reference.summary_tensor, 200, 5),
        hos.SummaryMemoryError,
        r"order=5 with S=200.*reference backend",
    ),
    (
        "reference-diagonal-memory",
        _memory(reference.summary_diagonal, 200, 4),
        MemoryError,
        r"order=4 with S=200",
    ),
    (
        "reference-backend-memory",
        _memory_reference(),
        MemoryError,
        r"S=25 groups .*50024 batched parameters",
    ),
]


# ----------------------------------------------------------------------- optimizers
def _gn(**kw):
    net = _net()
    loss = hos.model_loss(net, nn.MSELoss(), torch.ones(4, 2), torch.zeros(4, 1))
    args = {"params": net, "refresh_loss": loss, **kw}
    return lambda: hos.optim.GroupedNewton(**args)


def _sgdph(**kw):
    return lambda: hos.optim.SGDPH(_net().parameters(), **kw)


def _sgdph_step(closure):
    opt = hos.optim.SGDPH(_net().parameters())
    return lambda: opt.step(closure) if closure is not None else opt.step()


def _lrs(g=(1.0, 2.0), H=((2.0, 0.0), (0.0, 1.0)), d3=(1.0, 1.0), damping=1.0):
    return lambda: hos.optim.grouped_newton_lrs(
        torch.as_tensor(g, dtype=F64),
        torch.as_tensor(H, dtype=F64),
        torch.as_tensor(d3, dtype=F64),
        damping,
    )


def _loader(**kw):
    from torch.utils.data import DataLoader, TensorDataset

    net = _net()
    data = TensorDataset(torch.randn(6, 2), torch.randn(6, 1))
    args = {
        "model": net,
        "criterion": nn.MSELoss(),
        "loader": DataLoader(data, batch_size=3),
        "direction": {k: torch.ones_like(v) for k, v in net.named_parameters()},
        "partition": hos.Partition.per_layer(net),
        "progress": False,
        **kw,
    }
    return lambda: hos.summarize_loader(**args)


def _big_model(S: int) -> nn.Module:
    net = nn.Module()
    for i in range(S):
        net.register_parameter(f"p{i}", nn.Parameter(torch.zeros(1)))
    return net


def _big_direction_partition(S: int):
    net = _big_model(S)
    return {k: torch.ones_like(v) for k, v in net.named_parameters()}, hos.Partition.per_tensor(net)


_GN_PART_MISSES = hos.Partition(("first",), (("0.weight", "0.bias"),))

#: (id, call, exception, regex) for the optimizers, the cubic solver and the loader.
OPTIMIZER_ROWS = [
    (
        "GroupedNewton-params-int",
        _gn(params=42),
        TypeError,
        r"params must be an nn\.Module .*got int",
    ),
    (
        "GroupedNewton-params-empty",
        _gn(params={}),
        TypeError,
        r"params must be an nn\.Module .*got dict",
    ),
    (
        "GroupedNewton-refresh_loss",
        _gn(refresh_loss=None),
        TypeError,
        r"refresh_loss must be a callable.*None",
    ),
    ("GroupedNewton-lr-0", _gn(lr=0.0), ValueError, r"lr must be a finite number > 0.*got 0\.0"),
    ("GroupedNewton-lr-negative", _gn(lr=-1.0), ValueError, r"lr must be .*got -1\.0"),
    ("GroupedNewton-lr-nan", _gn(lr=float("nan")), ValueError, r"lr must be .*got nan"),
    ("GroupedNewton-lr-str", _gn(lr="0.1"), ValueError, r"lr must be .*got '0\.1'"),
    ("GroupedNewton-lr-bool", _gn(lr=True), ValueError, r"lr must be .*got True"),
    ("GroupedNewton-damping-0", _gn(damping=0.0), ValueError, r"damping must be .*> 0.*got 0\.0"),
    (
        "GroupedNewton-damping-inf",
        _gn(damping=float("inf")),
        ValueError,
        r"damping must be .*got inf",
    ),
    (
        "GroupedNewton-momentum-1",
        _gn(momentum=1.0),
        ValueError,
        r"momentum must be .*< 1\.0, got 1\.0",
    ),
    (
        "GroupedNewton-momentum-negative",
        _gn(momentum=-0.1),
        ValueError,
        r"momentum must be .*got -0\.1",
    ),
    ("GroupedNewton-period-0", _gn(period=0), ValueError, r"period must be an int >= 1, got 0"),
    (
        "GroupedNewton-period-float",
        _gn(period=2.5),
        ValueError,
        r"period must be an int >= 1, got 2\.5",
    ),
    (
        "GroupedNewton-period-bool",
        _gn(period=True),
        ValueError,
        r"period must be an int >= 1, got True",
    ),
    ("GroupedNewton-average-0", _gn(average=0), ValueError, r"average must be an int >= 1, got 0"),
    (
        "GroupedNewton-warmup-negative",
        _gn(warmup=-1),
        ValueError,
        r"warmup must be an int >= 0, got -1",
    ),
    (
        "GroupedNewton-partition-str",
        _gn(partition="per_tensor"),
        TypeError,
        r"partition must be a hos\.Partition, got str",
    ),
    (
        "GroupedNewton-partition-misses",
        _gn(partition=_GN_PART_MISSES),
        ValueError,
        r"params has \['2\.weight', '2\.bias'\] that no group holds",
    ),
    (
        "GroupedNewton-backend",
        _gn(backend="fast"),
        ValueError,
        r"backend must be one of .*got 'fast'",
    ),
    (
        "GroupedNewton-load_state_dict",
        lambda: _gn()().load_state_dict({}),
        ValueError,
        r"state_dict has no 'grouped_newton' entry",
    ),
    (
        "grouped_newton_lrs-g-2d",
        _lrs(g=((1.0, 2.0),)),
        ValueError,
        r"g must be a non-empty 1-D tensor.*\(1, 2\)",
    ),
    (
        "grouped_newton_lrs-g-empty",
        _lrs(g=()),
        ValueError,
        r"g must be a non-empty 1-D tensor.*\(0,\)",
    ),
    (
        "grouped_newton_lrs-H-shape",
        _lrs(H=(1.0, 2.0)),
        ValueError,
        r"H must have shape \(2, 2\), got \(2,\)",
    ),
    (
        "grouped_newton_lrs-d3-shape",
        _lrs(d3=(1.0,)),
        ValueError,
        r"d3 must have shape \(2,\), got \(1,\)",
    ),
    (
        "grouped_newton_lrs-g-nan",
        _lrs(g=(float("nan"), 1.0)),
        ValueError,
        r"g has non-finite entries \(\[nan, 1\.0\]\)",
    ),
    (
        "grouped_newton_lrs-H-inf",
        _lrs(H=((float("inf"), 0.0), (0.0, 1.0))),
        ValueError,
        r"H has non-finite entries",
    ),
    (
        "grouped_newton_lrs-H-asymmetric",
        _lrs(H=((1.0, 5.0), (0.0, 1.0))),
        ValueError,
        r"H must be symmetric",
    ),
    (
        "grouped_newton_lrs-damping-0",
        _lrs(damping=0.0),
        ValueError,
        r"damping must be a finite number > 0.*got 0\.0",
    ),
    (
        "grouped_newton_lrs-damping-nan",
        _lrs(damping=float("nan")),
        ValueError,
        r"damping must be .*got nan",
    ),
    (
        "grouped_newton_lrs-damping-bool",
        _lrs(damping=True),
        ValueError,
        r"damping must be .*got True",
    ),
    ("grouped_newton_lrs-damping-str", _lrs(damping="1"), ValueError, r"damping must be .*got '1'"),
    (
        "SGDPH-lr-negative",
        _sgdph(lr=-1.0),
        ValueError,
        r"lr must be a finite number >= 0.*got -1\.0",
    ),
    ("SGDPH-lr-nan", _sgdph(lr=float("nan")), ValueError, r"lr must be .*got nan"),
    ("SGDPH-momentum-1", _sgdph(momentum=1.0), ValueError, r"momentum must be .*< 1\.0, got 1\.0"),
    ("SGDPH-tau-0", _sgdph(tau=0.0), ValueError, r"tau must be a finite number > 0.*got 0\.0"),
    ("SGDPH-eps-0", _sgdph(eps=0.0), ValueError, r"eps must be .*got 0\.0"),
    (
        "SGDPH-weight_decay",
        _sgdph(weight_decay=-1e-4),
        ValueError,
        r"weight_decay must be .*got -0\.0001",
    ),
    (
        "SGDPH-curvature",
        _sgdph(curvature="bogus"),
        ValueError,
        r"curvature must be one of .*got 'bogus'",
    ),
    (
        "SGDPH-partial_hessian",
        lambda: hos.optim.SGDPH([{"params": _net().parameters(), "partial_hessian": "yes"}]),
        ValueError,
        r"partial_hessian must be True, False or None, got 'yes'",
    ),
    (
        "SGDPH-group-lr",
        lambda: hos.optim.SGDPH([{"params": _net().parameters(), "lr": -1.0}]),
        ValueError,
        r"lr must be .*got -1\.0",
    ),
    ("SGDPH-step-no-closure", _sgdph_step(None), TypeError, r"SGDPH\.step needs closure"),
    (
        "SGDPH-step-float-closure",
        _sgdph_step(lambda: 1.0),
        ValueError,
        r"closure must return the scalar loss.*got 1\.0",
    ),
    (
        "SGDPH-step-detached-closure",
        _sgdph_step(lambda: torch.tensor(1.0)),
        ValueError,
        r"closure must return the scalar loss as a tensor that requires grad.*tensor\(1\.\)",
    ),
    (
        "summarize_loader-model",
        _loader(model=lambda x: x),
        TypeError,
        r"model must be an nn\.Module, got function",
    ),
    (
        "summarize_loader-criterion-none",
        _loader(criterion=nn.MSELoss(reduction="none")),
        ValueError,
        r"criterion has reduction='none'",
    ),
    (
        "summarize_loader-reduction",
        _loader(reduction="avg"),
        ValueError,
        r"reduction must be one of .*got 'avg'",
    ),
    (
        "summarize_loader-reduction-mismatch",
        _loader(reduction="sum"),
        ValueError,
        r"reduction='sum' but the criterion has reduction='mean'",
    ),
    (
        "summarize_loader-progress",
        _loader(progress="yes"),
        TypeError,
        r"progress must be None .*got 'yes'",
    ),
    (
        "summarize_loader-loader-int",
        _loader(loader=5),
        TypeError,
        r"loader must be an iterable .*got int: 5",
    ),
    (
        "summarize_loader-loader-triples",
        _loader(loader=[(torch.ones(2, 2), torch.ones(2, 1), 0)]),
        TypeError,
        r"loader must yield \(inputs, targets\) pairs, but batch 0 is a tuple",
    ),
    ("summarize_loader-loader-empty", _loader(loader=[]), ValueError, r"loader yielded no samples"),
    (
        "summarize_loader-direction-missing",
        _loader(direction={"0.weight": torch.ones(3, 2)}),
        ValueError,
        r"direction keys .*missing \['0\.bias'",
    ),
    (
        "summarize_loader-direction-nan",
        _loader(
            direction={k: torch.full_like(v, float("nan")) for k, v in _net().named_parameters()}
        ),
        ValueError,
        r"direction\['0\.weight'\] has 6 NaN/Inf",
    ),
    (
        "summarize_loader-partition",
        _loader(partition=None),
        TypeError,
        r"partition must be a hos\.Partition, got None",
    ),
    (
        "summary_tensor_loader-memory",
        lambda: hos.summary_tensor_loader(
            _big_model(200), nn.MSELoss(), [], *_big_direction_partition(200), 5, progress=False
        ),
        hos.SummaryMemoryError,
        r"summary_tensor_loader: order=5 with S=200 groups .*summary_diagonal",
    ),
]

CORE_ROWS = [(rid, _call(fn, kw), exc, regex) for rid, fn, kw, exc, regex in _rows()] + SINGLE_ROWS
ALL_ROWS = CORE_ROWS + OPTIMIZER_ROWS


@pytest.mark.parametrize(
    ("call", "exception", "regex"), [r[1:] for r in ALL_ROWS], ids=[r[0] for r in ALL_ROWS]
)
def test_bad_input_fails_cleanly(call, exception, regex):
    with pytest.raises(exception) as info:
        call()
    message = str(info.value.args[0]) if info.type is KeyError else str(info.value)
    assert re.search(regex, message, re.DOTALL), f"message {message!r} does not match {regex!r}"
    assert ADVICE.search(message), f"message {message!r} does not say what to do"


def test_table_size():
    """The table is what the issue note reports; keep it honest when rows change."""
    assert len(CORE_ROWS) >= 230 and len(OPTIMIZER_ROWS) >= 56

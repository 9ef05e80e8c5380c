"""Every registered backend against hos.reference on tiny float64 models (fast).

The oracle runs on a twin whose norm layers are written by hand in primitive
operations, so exactness through BatchNorm/LayerNorm is checked against an
independent definition, not against torch.nn. The third case is a plain loss
function whose parameters are registered in another order than they are used
(checks the first-use ordering and pruning of the reverse backend), with a tied
weight and a group of two tensors.
"""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

import hos
from hos import reference
from hos._problem import Problem
from hos.backends import BACKENDS, Backend
from hos.backends.reverse import PathGraph
from tests.helpers import twins
from tests.helpers.analysis import result as analysis_result
from tests.helpers.analysis import run_quick
from tests.helpers.tolerances import DT, FLOAT32_SUMMARY
from tests.helpers.tolerances import assert_close as _close

TESTED = [b.value for b in BACKENDS if b is not Backend.REFERENCE]


class ConvBN(nn.Module):
    """Conv → BatchNorm2d (train mode) → tanh → Linear; the twin's norm from tests/helpers/twins.py."""

    def __init__(self, twin: bool):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = twins.BatchNorm2d(2) if twin else nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


class LayerNormMLP(nn.Module):
    """Linear → LayerNorm → tanh → Linear; the twin's norm from tests/helpers/twins.py."""

    def __init__(self, twin: bool):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.norm = twins.LayerNorm(5) if twin else nn.LayerNorm(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _model_case(cls, criterion, x, y, seed, per_layer=False):
    torch.manual_seed(seed)
    model = cls(twin=False).to(DT).train()
    twin = cls(twin=True).to(DT)
    missing, _ = twin.load_state_dict(model.state_dict(), strict=False)  # no norm buffers
    assert not missing, missing
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed + 7)
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}
    part = hos.Partition.per_layer(model) if per_layer else hos.Partition.per_tensor(params)
    return (
        hos.model_loss(model, criterion, x, y),
        hos.model_loss(twin, criterion, x, y),
        params,
        u,
        part,
    )


def _reordered_case():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=gen, dtype=DT)
    # registered b, c, a; used a (with its input x), c, b, then a again (tied)
    params = {
        "b": torch.randn(2, 4, generator=gen, dtype=DT),
        "c": torch.randn(4, generator=gen, dtype=DT),
        "a": torch.randn(4, 3, generator=gen, dtype=DT),
    }
    u = {k: torch.randn(v.shape, generator=gen, dtype=DT) for k, v in params.items()}

    def loss(p):
        h = torch.tanh(nn.functional.linear(x, p["a"]) + p["c"])
        out = nn.functional.linear(h, p["b"])
        return (out**2).mean() + 0.1 * (torch.sin(p["a"]) * p["a"]).sum()

    part = hos.Partition.from_groups(params, {"head": ["b"], "first": ["a", "c"]})
    return loss, loss, params, u, part


def _cases():
    gen = torch.Generator().manual_seed(11)
    img = torch.randn(4, 1, 5, 5, generator=gen, dtype=DT)
    cls_y = torch.tensor([0, 2, 1, 2])
    vec = torch.randn(5, 4, generator=gen, dtype=DT)
    reg_y = torch.randn(5, 2, generator=gen, dtype=DT)
    return {
        "conv-batchnorm": lambda: _model_case(ConvBN, nn.CrossEntropyLoss(), img, cls_y, 0, True),
        "layernorm-mlp": lambda: _model_case(LayerNormMLP, nn.MSELoss(), vec, reg_y, 1),
        "reordered-tied": _reordered_case,
    }


CASES = _cases()


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    loss, twin, params, u, part = CASES[request.param]()
    oracle = {d: reference.summary_tensor(twin, params, u, part, d) for d in (1, 2, 3, 4)}
    return request.param, loss, params, u, part, oracle


@pytest.mark.parametrize("backend", TESTED)
def test_summarize_matches_oracle_on_tiny_models(case, backend):
    name, loss, params, u, part, oracle = case
    s = hos.summarize(loss, params, u, part, backend=backend)
    _close(s.g, oracle[1], f"{name} g [{backend}]")
    _close(s.H, oracle[2], f"{name} H [{backend}]")
    _close(s.d3, torch.einsum("iii->i", oracle[3]), f"{name} d3 [{backend}]")


@pytest.mark.parametrize("backend", TESTED)
@pytest.mark.parametrize("order", [1, 3, 4])
def test_tensor_and_diagonal_match_oracle(case, backend, order):
    name, loss, params, u, part, oracle = case
    if order < 4 or backend == "reverse":  # forward's D^(4) (3 nested jvp over grad) is slow
        full = hos.summary_tensor(loss, params, u, part, order, backend=backend)
        _close(full, oracle[order], f"{name} D^({order}) [{backend}]")
    diag = hos.summary_diagonal(loss, params, u, part, order, backend=backend)
    expected = torch.stack([oracle[order][(i,) * order] for i in range(len(part))])
    _close(diag, expected, f"{name} diag D^({order}) [{backend}]")


def test_the_registry_and_the_backend_names_agree():
    """One registry: every Backend name but "auto" is registered, the CLI offers exactly the
    registered ones (the oracle aside), and a new backend needs no edit of the callers."""
    from hos import cli
    from hos.backends import SummaryBackend, registered, resolve

    assert set(registered()) == {b.value for b in Backend} - {"auto"}
    assert all(isinstance(b, SummaryBackend) for b in registered().values())
    assert resolve("auto") is registered()["taylor"]
    summary = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.values()
                   if any(x.dest == "backend" for x in a._actions))  # fmt: skip
    offered = next(x for x in summary._actions if x.dest == "backend").choices
    assert set(offered) == (set(registered()) - {"reference"}) | {"auto"}
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        resolve("fast")


def test_auto_is_a_registered_exact_backend():
    assert Backend.AUTO not in BACKENDS and Backend.REFERENCE in BACKENDS
    loss, twin, params, u, part = CASES["layernorm-mlp"]()
    s = hos.summarize(loss, params, u, part)
    _close(s.H, reference.summary_tensor(twin, params, u, part, 2), "auto H")


def test_reverse_orders_groups_by_first_use():
    loss, _, params, u, part = _reordered_case()
    # groups are ("head", "first"); "first" (a, c) is used before "head" (b)
    with hos.ExactOps():
        path = PathGraph(Problem(loss, params, u, part))
    assert [part.names[s] for s in path.order] == ["first", "head"]


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    """analysis/bench_summaries.py, bench_memory.py and bench_large_models.py --quick into a
    temporary folder (HOS_ANALYSIS_OUT): each writes only its own sections of the one JSON."""
    for script in ("bench_summaries.py", "bench_memory.py", "bench_large_models.py"):
        run_quick(script, tmp_path)
    data = analysis_result(tmp_path, "bench_summaries_quick.json")
    assert data["ratios"]["mlp"]["ratio"]["hos.reverse"]["summarize"] > 0
    assert data["certificate"]["mlp"]["summarize"]["repeated"]["ratio"] > 0
    assert data["scaling"]["by_S"]["S"] == [4, 6]
    assert all(case["peak_mib"] > 0 for case in data["memory"]["mlp"].values())
    # one unit everywhere: a plain criterion(model(x), y).backward() on the module
    assert "plain" in data["ratios"]["mlp"]["unit"] and "plain" in data["environment"]["unit"]
    assert data["ratios"]["mlp"]["model_loss_gradient_s"] > 0
    assert "plain gradient summarize" in data["memory"]["mlp"]
    (large,) = data["large"].values()
    assert large["summarize"]["hos.taylor"]["seconds"] > 0 and large["bounds"]["rows"] > 0
    for section in ("", "certificate_", "memory_", "large_"):
        assert data[f"{section}environment"]["torch"] == torch.__version__
    names = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {f"bench_{n}_quick.png" for n in ("ratios", "scaling", "certificate", "memory")} <= names


@pytest.mark.slow
def test_small_models_benchmark_quick(tmp_path):
    """analysis/bench_small_models.py --quick, its JSON in a temporary folder."""
    run_quick("bench_small_models.py", tmp_path, timeout=600)
    rows = analysis_result(tmp_path, "bench_small_models_quick.json")["rows"]
    assert len(rows) == 4 and all(r["ratio"] > 1 and r["fallback"] is None for r in rows.values())


@pytest.mark.slow
def test_attention_memory_benchmark_quick(tmp_path):
    """analysis/bench_attention_memory.py --quick: every variant measured on both models, and the
    rows' attention op never holds more than the decomposition."""
    run_quick("bench_attention_memory.py", tmp_path, timeout=600)
    models = analysis_result(tmp_path, "bench_attention_memory_quick.json")["models"]
    assert set(models) == {"transformer6", "gpt2"}
    for m in models.values():
        rows = {v: r["rows_mib"] for v, r in m["variants"].items()}
        assert set(rows) == {"decomposition", "op", "op + blocks"}
        assert rows["op"] <= rows["decomposition"] and m["plain_backward"]["tensor_mib"] > 0


def test_flop_benchmark_quick(tmp_path):
    """analysis/bench_flops.py --quick: the gradient's count is the MLP's closed form (the
    script checks it), and each summary's count is a positive multiple of it."""
    from analysis.bench_flops import mlp_gradient_flops

    run_quick("bench_flops.py", tmp_path, timeout=300)
    mlp = analysis_result(tmp_path, "bench_flops_quick.json")["models"]["mlp"]
    assert (
        mlp["gradient_flops"]
        == mlp_gradient_flops(8)
        == 2 * 8 * 2 * (784 * 1024 + 1024 * 200 + 200 * 100 + 100 * 10)
        + 2 * 8 * (1024 * 200 + 200 * 100 + 100 * 10)
    )
    assert set(mlp["methods"]) == {"summarize", "diag D³", "H̄"}
    for m in mlp["methods"].values():
        # every summary runs the forward's products at least once, and more besides
        assert m["flop_ratio"] > 205.0 / 456.0 and m["time_ratio"] > 0 and m["kernels"] > 0
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # the second run
        kept = analysis_result(tmp_path, "bench_flops_kept_quick.json")
        assert kept["keep_freed_memory"] and not analysis_result(
            tmp_path, "bench_flops_quick.json")["keep_freed_memory"]  # fmt: skip
        # the same arithmetic, whatever the allocator does
        assert kept["models"]["mlp"]["methods"]["summarize"]["flops"] == (
            mlp["methods"]["summarize"]["flops"])  # fmt: skip


def test_pair_cut_benchmark_quick(tmp_path):
    """analysis/bench_pair_cuts.py --quick: the cuts remove products (the MLP's 1024 × 200 layer
    no longer carries x_3, the pairs, nor its weight's pairs) and give the whole pass's numbers
    to float32 rounding."""
    run_quick("bench_pair_cuts.py", tmp_path, timeout=300)
    mlp = analysis_result(tmp_path, "bench_pair_cuts_quick.json")["models"]["mlp"]
    whole, cut, crossed = (mlp["settings"][s] for s in ("whole", "cuts", "cuts + own weight"))
    assert whole["flop_ratio"] > cut["flop_ratio"] > crossed["flop_ratio"] > 205.0 / 456.0
    for s in (cut, crossed):
        assert s["H_difference"] < 1e-4 and s["d3_difference"] < 1e-4
        assert s["best"] > 0 and s["memory_ratio"] > 0


@pytest.mark.slow
def test_hessian_alone_benchmark_quick(tmp_path):
    """analysis/bench_hessian_alone.py --quick: every method's H̄ equals hos's (float32)."""
    run_quick("bench_hessian_alone.py", tmp_path, timeout=600)
    (mlp,) = analysis_result(tmp_path, "bench_hessian_alone_quick.json")["models"].values()
    assert set(mlp["methods"]) == {
        "hos H̄",
        "hos ḡ, H̄",
        "hos triple",
        "double backward",
        "torch.func",
    }
    for method in mlp["methods"].values():
        assert method["gradients"] > 0 and method["max_rel_diff_to_hos"] < FLOAT32_SUMMARY


def test_a_mark_counts_only_for_the_tensor_it_was_made_for():
    """Reverse mode marks each moved weight by `id`; a tensor that later takes a dead marked
    tensor's address (CPython reuses them: FSDP2's mixed precision drops the moved weight once
    cast, and a later tensor once failed its `F.linear` with the mark's float64 θ) is unmarked."""
    import weakref

    from hos.backends.reverse import _PathMode

    gone, later = torch.ones(2), torch.zeros(2)
    mode = _PathMode({id(later): (gone, gone, gone, 0, weakref.ref(gone))})  # a reused id
    assert mode._mark_of(later) is None
    mode.marked[id(gone)] = (gone, gone, gone, 1, weakref.ref(gone))
    assert mode._mark_of(gone)[3] == 1

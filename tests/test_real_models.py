"""Model code hos did not write: torchvision, timm, Hugging Face transformers and torch.nn.

Each model of tests/helpers/realmodels.py (float64, random weights, a coarse partition) is checked

* against finite differences of φ(η) with Richardson extrapolation, an oracle no automatic
  differentiation can fool (ḡ, H̄ and diag D³ of `summarize`; an entry counts where two step
  sizes agree, and most must);
* across backends: Taylor mode against nested reverse mode (summarize, the full D³ by
  multivariate Taylor mode, diag D⁴), all exact compositions, to 1e-10;
* for state: parameters, buffers (BatchNorm statistics, `num_batches_tracked`), train/eval
  mode, `.grad` and the global RNG are untouched;

and Taylor mode must follow every one of them without falling back to reverse mode.
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

import hos
from hos.backends import passes, taylor
from hos.taylor.cuts import CutTracker, PairCutTracker
from tests.helpers import fd
from tests.helpers import realmodels as R
from tests.helpers.thirdparty import needs
from tests.helpers.tolerances import AGREE, FD_DEEP, FLOAT32_INSIDE

pytestmark = pytest.mark.usefixtures("single_thread")


def _fd_tol(b, key: str) -> float:
    return FD_DEEP[key] if b.precision == torch.float64 else FLOAT32_INSIDE[key]


def _agree(b) -> float:
    return AGREE if b.precision == torch.float64 else FLOAT32_INSIDE["agree"]


#: the models whose finite-difference check takes more than a few seconds: -m slow
HEAVY = {"resnet18-eval", "efficientnet_b0", "mobilenet_v3_small"}


def _params(names):
    return [
        pytest.param(
            n,
            marks=[
                pytest.mark.skipif(
                    not R.available(R.BY_NAME[n].requires),
                    reason=R.unavailable(R.BY_NAME[n].requires) or "",
                ),  # fmt: skip
                *([pytest.mark.slow] if n in HEAVY else []),
                *([pytest.mark.thirdparty] if R.BY_NAME[n].requires else []),
            ],
        )
        for n in names
    ]


ALL = _params([e.name for e in R.ENTRIES])


@functools.cache
def _built(name: str) -> R.Built:
    return R.BY_NAME[name].build()


@functools.cache
def _taylor_summary(name: str):
    b = _built(name)
    s = hos.summarize(b.loss, b.params, b.direction, b.partition)
    return s, hos.last_fallback()


@pytest.mark.parametrize("name", ALL)
def test_summary_matches_finite_differences(name):
    b = _built(name)
    s, fallback = _taylor_summary(name)
    assert fallback is None, f"{name}: Taylor mode fell back: {fallback}"
    path = fd.Path(b.loss, b.params, b.direction, b.partition)
    for key in b.fd_keys:
        tol = _fd_tol(b, key)
        a, trusted = fd.trusted_oracle(path, key, tol)
        share = trusted.double().mean().item()
        assert share >= 0.5, f"{name} {key}: the oracle agrees with itself on {share:.0%} only"
        fd.close(getattr(s, key), a, tol, f"{name} {key} vs finite differences", trusted)


@pytest.mark.parametrize("name", ALL)
def test_backends_agree_and_taylor_mode_follows(name):
    b = _built(name)
    args = (b.loss, b.params, b.direction, b.partition)
    s, _ = _taylor_summary(name)
    r = _reverse_summary(name)
    agree = _agree(b)
    for key in ("g", "H", "d3"):
        fd.close(getattr(s, key), getattr(r, key), agree, f"{name} {key}: taylor vs reverse")
    D3 = hos.summary_tensor(*args, 3)
    assert hos.last_fallback() is None, f"{name}: multivariate Taylor mode fell back"
    fd.close(D3, hos.summary_tensor(*args, 3, backend="reverse"), agree, f"{name} D3")
    d4 = hos.summary_diagonal(*args, 4)
    assert hos.last_fallback() is None, f"{name}: diag D4 fell back"
    fd.close(d4, hos.summary_diagonal(*args, 4, backend="reverse"), agree, f"{name} diag D4")


@functools.cache
def _reverse_summary(name: str):
    b = _built(name)
    return hos.summarize(b.loss, b.params, b.direction, b.partition, backend="reverse")


#: the models whose attention every Taylor pass takes as one rule (`hos.taylor.attention`):
#: `F.scaled_dot_product_attention` or `nn.MultiheadAttention` with q, k, v from one projection
#: (or moving along the same lines)
ATTENTION_AS_ONE_RULE = {
    "vit-torchvision", "vit-timm", "gpt2-sdpa", "gpt2-sdpa-leftpad", "gpt2-sdpa-rightpad",
    "llama-sdpa-leftpad", "qwen2-sdpa-rightpad", "mistral-sdpa-leftpad", "bert-sdpa",
    "encoder-post-train", "encoder-pre-train", "encoder-post-eval", "encoder-pre-eval",
}  # fmt: skip


#: the models with at most `PAIR_MAX_GROUPS` tensors: one group per tensor takes the one-pass
#: summary
PER_TENSOR_ONE_PASS = _params(["mixtral-router", "lstm-tied"])


@pytest.mark.parametrize("name", PER_TENSOR_ONE_PASS)
def test_the_one_pass_summary_per_tensor_matches_reverse_mode(name, monkeypatch, caplog):
    """One group per tensor (S <= 12): the one pass, its top rows cut and its layers' own-weight
    pairs contracted, against reverse mode; and it runs (the pairs' budget: once the two-line
    layers of Mixtral's router crossed, they no longer weighed in it and the pass gave way to
    reverse rows, at 2.5 times the time)."""
    b = _built(name)
    part = hos.Partition.per_tensor(b.params)
    assert len(part) <= taylor.PAIR_MAX_GROUPS
    crossed, contract = [], PairCutTracker.contract

    def counted(self, value, S):
        crossed.append(len(self.crossings))
        return contract(self, value, S)

    monkeypatch.setattr(PairCutTracker, "contract", counted)
    with caplog.at_level(logging.INFO, logger="hos"):
        s = hos.summarize(b.loss, b.params, b.direction, part)
    assert hos.last_fallback() is None, f"{name}: Taylor mode fell back"
    assert "gives way" not in caplog.text and crossed and crossed[0] > 0, caplog.text
    r = hos.summarize(b.loss, b.params, b.direction, part, backend="reverse")
    for what in ("g", "H", "d3"):
        fd.close(
            getattr(s, what), getattr(r, what), _agree(b), f"{name} {what}: one pass vs reverse"
        )


@pytest.mark.parametrize("name", ALL)
def test_cut_taylor_passes_match_reverse_mode(name, monkeypatch):
    """One group a pass: every pass past the first cuts its top coefficient at the layers linear
    in their input (`hos.taylor.cuts`, the gradients from one backward at θ) and takes attention
    as one rule; diag D³ against nested reverse mode, with the cuts and the attention rule's calls
    counted so that the check cannot pass without them."""
    b = _built(name)
    monkeypatch.setattr(passes, "CUT_PAYBACK", 0)  # these few groups would not pay it back
    made, attended = [], []
    cut = CutTracker._cut
    monkeypatch.setattr(CutTracker, "_cut", lambda *a: made.append(1) or cut(*a))
    follow = passes.follow_attention

    def counted(tracker, *args):  # attention as one rule where its inputs move
        out = follow(tracker, *args)
        if any(tracker.jet(t) is not None for t in args[:3]):
            attended.append(out is not None)
        return out

    monkeypatch.setattr(passes, "follow_attention", counted)
    d3 = hos.summary_diagonal(b.loss, b.params, b.direction, b.partition, 3, chunk=1)
    assert hos.last_fallback() is None, f"{name}: Taylor mode fell back"
    assert made, f"{name}: no layer linear in its input was cut"
    if name in ATTENTION_AS_ONE_RULE:
        assert attended and all(attended), f"{name}: attention declined {attended}"
    fd.close(d3, _reverse_summary(name).d3, _agree(b), f"{name} diag D3: cut passes vs reverse")


@pytest.mark.parametrize("name", ALL)
def test_the_model_and_the_run_are_untouched(name):
    b = _built(name)
    model = b.model
    mode = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = None
    rng = torch.random.get_rng_state()
    hos.summarize(b.loss, b.params, b.direction, b.partition)
    hos.summary_diagonal(b.loss, b.params, b.direction, b.partition, 3)
    with pytest.MonkeyPatch.context() as patch:  # the passes past the first cut
        patch.setattr(passes, "CUT_PAYBACK", 0)
        hos.summary_diagonal(b.loss, b.params, b.direction, b.partition, 3, chunk=1)
    assert torch.equal(torch.random.get_rng_state(), rng), f"{name}: the global RNG moved"
    assert [m.training for m in model.modules()] == mode
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{name}: {k} changed"


# --------------------------------------------------------------------------- specifics
@pytest.mark.thirdparty
@needs("torchvision")
def test_stochastic_depth_is_the_identity_during_a_summary():
    """EfficientNet in train mode: with stochastic depth on, the loss is random; during a
    summary it keeps every branch unscaled, i.e. equals the same network with p = 0."""
    from torchvision.ops import StochasticDepth

    b = _built("efficientnet_b0")
    depth = [m for m in b.model.modules() if isinstance(m, StochasticDepth)]
    assert any(m.p > 0 for m in depth) and all(m.training for m in depth)
    with torch.no_grad():
        value = b.loss(b.params)
        saved = [m.p for m in depth]
        for m in depth:
            m.p = 0.0
        try:
            expected = b.loss(b.params)
        finally:
            for m, p in zip(depth, saved):
                m.p = p
        raw = [torch.nn.functional.cross_entropy(b.model(b.loss.inputs), b.loss.targets)
               for _ in range(3)]  # fmt: skip
    assert float(value) == float(expected)
    assert len({float(x) for x in raw}) > 1, "outside a summary stochastic depth is random"


@pytest.mark.thirdparty
@needs("transformers")
def test_hugging_face_outputs_need_an_adapter_and_say_so():
    b = _built("gpt2-eager")
    bare = hos.model_loss(b.model, R._lm_cross_entropy, b.loss.inputs, b.loss.targets)
    with pytest.raises(TypeError, match=r"returned a CausalLMOutput.*output='logits'"):
        bare(b.params)
    wrong = hos.model_loss(b.model, R._lm_cross_entropy, b.loss.inputs, b.loss.targets,
                           output="scores")  # fmt: skip
    with pytest.raises(KeyError, match=r"output='scores'.*fields: .*'logits'"):
        wrong(b.params)
    as_callable = hos.model_loss(b.model, R._lm_cross_entropy, b.loss.inputs, b.loss.targets,
                                 output=lambda out: out.logits)  # fmt: skip
    assert float(as_callable(b.params)) == float(b.loss(b.params))
    with pytest.raises(TypeError, match=r"output must be None, a field name or a callable"):
        hos.model_loss(b.model, R._lm_cross_entropy, b.loss.inputs, b.loss.targets, output=3)


def test_tied_weights_are_one_parameter_and_one_group():
    b = _built("lstm-tied")
    assert "decoder.weight" not in b.params and "embed.weight" in b.params
    s, _ = _taylor_summary("lstm-tied")
    assert s.names[0] == "embedding (tied)" and float(s.H[0, 0]) != 0.0


@pytest.mark.slow
@pytest.mark.thirdparty
@needs("torchvision")
def test_rows_path_per_tensor_on_resnet18():
    """Per-tensor groups (S = 62 > 12): reverse rows on one graph with the factored first
    convolution, jets riding along through torchvision's in-place ReLUs."""
    b = _built("resnet18-train")
    part = hos.Partition.per_tensor(b.model)
    s = hos.summarize(b.loss, b.params, b.direction, part, chunk=16)
    assert hos.last_fallback() is None, hos.last_fallback()
    d3 = hos.summary_diagonal(b.loss, b.params, b.direction, part, 3, backend="reverse")
    fd.close(s.d3, d3, AGREE, "resnet18 per-tensor d3, taylor rows vs reverse")


@pytest.mark.slow
@pytest.mark.thirdparty
@needs("torchvision")
def test_rows_path_per_tensor_on_mobilenet_writes_out_the_depthwise_convolutions(monkeypatch):
    """Per-tensor groups (S > 12) on torchvision's MobileNetV3: the rows of H̄ go through the
    written-out depthwise convolutions (hos._depthwise) and equal PyTorch's own double backward
    of the grouped convolution (the rewrite off)."""
    import torch.nn.functional as F

    import hos._exact as exact
    from hos._depthwise import depthwise_conv2d

    b = _built("mobilenet_v3_small")
    part = hos.Partition.per_tensor(b.model)
    assert len(part) > 12
    written = []

    def counted(*args, **kwargs):
        written.append(1)
        return depthwise_conv2d(*args, **kwargs)

    monkeypatch.setitem(exact.REWRITTEN_AT_SECOND_ORDER, F.conv2d, counted)
    H = hos.summary_tensor(b.loss, b.params, b.direction, part, 2, backend="reverse")
    assert written
    monkeypatch.setattr(exact, "REWRITTEN_AT_SECOND_ORDER", {})
    native = hos.summary_tensor(b.loss, b.params, b.direction, part, 2, backend="reverse")
    fd.close(H, native, AGREE, "mobilenet per-tensor H̄, written out vs PyTorch's kernel")

"""Random chains of ops that Taylor mode follows, against the oracle (hypothesis).

Each example composes 1-6 ops drawn from a vocabulary of everyday calls (elementwise,
products with parameters, reductions, softmax, views, in-place writes, indexing writes,
shape-only arguments, concatenation) into a loss of three parameter tensors. The default
backend (Taylor mode) must take no fallback and match hos.reference (nested jacfwd, a
different composition of AD) for ḡ, H̄, diag D³, diag D⁴ and the full D³.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hos
from hos import reference
from tests.helpers.fd import close
from tests.helpers.tolerances import AGREE

DT = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def _softmax(h, p):
    return F.softmax(h, dim=-1) * 3.0


def _log_softmax(h, p):
    return F.log_softmax(h, dim=0)


def _inplace(h, p):
    h = h * 1.0
    h.mul_(p["b"]).add_(0.2)
    return h


def _setitem(h, p):
    h = h.clone()
    h[:, 0] = torch.sin(h[:, 1] * 1.0)
    return h


def _masked(h, p):
    return h.masked_fill(p["mask"], 0.3)


def _type_as(h, p):
    return h * p["buffer"].type_as(h)


def _matmul(h, p):
    return torch.tanh(h @ p["a"].T @ p["a"] / 4.0)


#: (name, op of h (3, 4) and the parameters -> a tensor of shape (3, 4))
VOCABULARY = [
    ("tanh", lambda h, p: torch.tanh(h)),
    ("sigmoid", lambda h, p: torch.sigmoid(h)),
    ("sin", lambda h, p: torch.sin(h)),
    ("exp", lambda h, p: torch.exp(0.3 * h)),
    ("square", lambda h, p: h * h),
    ("cube", lambda h, p: h**3 / 3.0),
    ("gelu", lambda h, p: F.gelu(h)),
    ("silu", lambda h, p: F.silu(h)),
    ("mul-param", lambda h, p: h * p["b"]),
    ("add-param", lambda h, p: h + p["c"]),
    ("matmul", _matmul),
    ("softmax", _softmax),
    ("log_softmax", _log_softmax),
    ("transpose-back", lambda h, p: h.T.contiguous().T),
    ("reshape", lambda h, p: h.reshape(4, 3).reshape(3, 4)),
    ("mean-broadcast", lambda h, p: h - h.mean(dim=1, keepdim=True)),
    ("cat-split", lambda h, p: torch.cat([h[:, :2], p["c"][:, 2:] * h[:, 2:]], dim=1)),
    ("inplace", _inplace),
    ("setitem", _setitem),
    ("masked_fill", _masked),
    ("type_as", _type_as),
    ("where", lambda h, p: torch.where(p["mask"], h, torch.cos(h))),
]


def _params():
    g = torch.Generator().manual_seed(11)
    return {
        "a": 0.5 * torch.randn(3, 4, generator=g, dtype=DT),
        "b": 0.5 * torch.randn(3, 4, generator=g, dtype=DT) + 1.0,
        "c": 0.5 * torch.randn(3, 4, generator=g, dtype=DT),
    }


CONSTANTS = {
    "mask": torch.rand(3, 4, generator=torch.Generator().manual_seed(12)) > 0.5,
    "buffer": torch.linspace(0.5, 1.5, 4, dtype=torch.float32),
}


def _loss(chain):
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(13), dtype=DT)

    def loss(p):
        q = {**p, **CONSTANTS}
        h = torch.tanh(p["a"] + 0.5 * p["c"])
        for _, op in chain:
            h = op(h, q)
        return (h * weights).sum() + (p["b"] ** 2).sum() * 0.1

    return loss


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=6))
def test_random_chains_match_the_oracle(chain):
    names = [n for n, _ in chain]
    loss, params = _loss(chain), _params()
    u = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(14), dtype=DT)
         for k, v in params.items()}  # fmt: skip
    part = hos.Partition.per_tensor(params)
    s = hos.summarize(loss, params, u, part)
    assert hos.last_fallback() is None, (names, hos.last_fallback())
    d4 = hos.summary_diagonal(loss, params, u, part, 4)
    assert hos.last_fallback() is None, (names, hos.last_fallback())
    D3 = hos.summary_tensor(loss, params, u, part, 3)
    assert hos.last_fallback() is None, (names, hos.last_fallback())
    expected = [reference.summary_tensor(loss, params, u, part, k) for k in (1, 2, 3)]
    tol = AGREE
    close(s.g, expected[0], tol, f"{names} g")
    close(s.H, expected[1], tol, f"{names} H")
    close(s.d3, torch.einsum("iii->i", expected[2]), tol, f"{names} d3")
    close(D3, expected[2], tol, f"{names} D3")
    close(d4, reference.summary_diagonal(loss, params, u, part, 4), tol, f"{names} d4")

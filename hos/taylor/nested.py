r"""The generic univariate rule: nested forward mode along the polynomial path.

For a call f without a rule of its own, the coefficients of y = f(x(t)) with
$x(t) = x_0 + \sum_k x_k t^k$ are $y_k = \tfrac{1}{k!} d^k y/dt^k$ at 0: K nested
`jvp` in t, vmapped over the directions -- exact for every op that forward-mode AD
supports. With pairs, $\partial^2/\partial s\,\partial t\, f(x_0 + s x_i + t x_j + st x_{ij})$
gives the mixed coefficients.
"""

from __future__ import annotations

import math

import torch
from torch.func import jvp, vmap

from hos.taylor import jets as J
from hos.taylor.fallback import TaylorFallback
from hos.taylor.jets import Jet
from hos.taylor.series import nested_derivatives, no_forward_rule
from hos.taylor.trees import tree_flatten, tree_unflatten

__all__ = ["generic_rule"]


def generic_rule(tracker, func, leaves, spec, jets, outs) -> list:
    """Nested jvp in t along x_0 + Σ_k x_k t^k, vmapped over the directions."""
    K = tracker.order
    union = J.union(j.groups for j in jets.values())
    floating = [
        i for i, o in enumerate(outs) if isinstance(o, torch.Tensor) and o.is_floating_point()
    ]
    positions = list(jets)
    stacks = [
        torch.stack([J.aligned(jets[p], union, k, leaves[p]) for k in range(K)], dim=1)
        for p in positions
    ]
    primals = [leaves[p].detach() for p in positions]
    dtype = primals[0].dtype

    def along(*coeff_stacks):
        def path(t):
            new = list(leaves)
            for p, x0, c in zip(positions, primals, coeff_stacks):
                value, power = x0, 1
                for k in range(K):
                    power = power * t
                    value = value + c[k] * power
                new[p] = value
            a, kw = tree_unflatten(new, spec)
            result, _ = tree_flatten(func(*a, **kw))
            return tuple(result[i] for i in floating)

        t0 = torch.zeros((), dtype=dtype, device=primals[0].device)
        derivs = nested_derivatives(path, t0, K)[1:]
        return tuple(
            torch.stack([derivs[k][i] / math.factorial(k + 1) for k in range(K)])
            for i in range(len(floating))
        )

    try:
        results = vmap(along)(*stacks)  # each (m, K, *out.shape)
    except (NotImplementedError, RuntimeError) as exc:
        if not no_forward_rule(exc):
            raise
        name = getattr(func, "__name__", func)
        raise TaylorFallback(f"{name} has no forward-mode derivative in PyTorch") from exc
    jets_out: list[Jet | None] = [None] * len(outs)
    for i, r in zip(floating, results):
        jets_out[i] = Jet(union, [r[:, k] for k in range(K)])
    combos = tracker._self_pairs(union)
    if combos:  # ∂²/∂s∂t f(x0 + s x_i + t x_j + st x_ij) at 0, vmapped over the pairs
        labels = tuple(c[0] for c in combos)
        first_i = [J.rows(st[:, 0], [c[1] for c in combos]) for st in stacks]
        first_j = [J.rows(st[:, 0], [c[2] for c in combos]) for st in stacks]
        own = [J.aligned_mixed(jets[p], labels, leaves[p]) for p in positions]

        def mixed(*blocks):
            n = len(positions)
            a, b, c = blocks[:n], blocks[n : 2 * n], blocks[2 * n :]

            def path(s, t):
                new = list(leaves)
                for p, x0, ai, bj, cij in zip(positions, primals, a, b, c):
                    new[p] = x0 + s * ai + t * bj + (s * t) * cij
                res, _ = tree_flatten(func(*tree_unflatten(new, spec)[0],
                                           **tree_unflatten(new, spec)[1]))  # fmt: skip
                return tuple(res[i] for i in floating)

            zero = torch.zeros((), dtype=dtype, device=primals[0].device)
            one = torch.ones_like(zero)

            def along_t(s):
                return jvp(lambda t: path(s, t), (zero,), (one,))[1]

            return jvp(along_t, (zero,), (one,))[1]

        values = vmap(mixed)(*first_i, *first_j, *own)
        for i, v in zip(floating, values):
            jets_out[i].pairs, jets_out[i].mixed = labels, v
    return jets_out

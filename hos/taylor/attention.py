r"""Attention in a univariate Taylor pass as one rule, not as its written-out ops.

For O = P v, P = softmax(S + mask), S = c·q kᵀ (c the scale) and a line along which q, k, v
move with coefficients q_i, k_i, v_i (q_0 = q and so on, i = 1..K), the coefficients of O are

    S_k = c Σ_{i+j=k} q_i k_jᵀ                      (one product of concatenations, below)
    E(t) = exp(Σ_k S_k t^k) = 1 + Σ_k E_k t^k       (`exp_series`)
    G_k = P_0 ⊙ E_k,   z_k = Σ_col G_k,   1/(1 + Σ_k z_k t^k) = 1 + Σ_k r_k t^k
    P_k = Σ_{j=0..k} r_j G_{k-j}                    (G_0 = P_0, r_0 = 1)
    O_k = Σ_{i+j=k} P_i v_j

since P(t) = P_0 ⊙ E(t) / ⟨P_0, E(t)⟩ along each row (softmax is P_0 reweighted by exp of the
scores' increment; a mask adds a constant to S, so it only enters P_0). A masked score has
P_0 = 0, so every P_k is 0 there, and a row masked whole (P_0 = 0, as PyTorch's safe softmax
gives it) gets z = r = 0 and P_k = 0: what the written-out ops give.

Written out (`hos._attention.scaled_dot_product_attention` under the tracker), the same
coefficients cost one (L × L) product per pair (i, j) and a sum per order for S and for O, the
scale on every coefficient, and the softmax's log-sum-exp series: ~45 passes over the (L × L)
coefficients per line at K = 3 instead of ~22 here. The products run as few, wide ones:

* S_k = [c q_0 … c q_k] · [k_k … k_0]ᵀ, the coefficients concatenated along the head dim (the
  sum over i is inside the product; q_0 and k_0 repeated over the lines);
* P_0 [v_1 … v_K] with the lines and orders folded into the columns (P_0 is shared by every
  line: no copy of it per line), and P_i [v_0 … v_{K-i}] for i ≥ 1.

`follow_attention` is the tracker's side. Inputs moving along different lines (q, k and v from
separate projections, a pass seeded at one of them) are placed on the union of the lines, with
zero rows where one does not move. It declines (None, and the written-out ops run under the
tracker as before) whenever the call is not the plain case — pairs followed, a mask that moves,
a broadcast coefficient block, mixed precision, gradients recorded, a context Taylor mode
refuses — so it never decides what the engine would refuse.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hos.taylor import jets as J
from hos.taylor.engine import _context_refusal
from hos.taylor.fallback import TaylorFallback, strict
from hos.taylor.jets import Coeffs, Jet
from hos.taylor.series import exp_series
from hos.taylor.univariate import UnivariateTracker

__all__ = ["attention_coefficients", "follow_attention"]


def _lines(primal: torch.Tensor, m: int) -> torch.Tensor:
    """The primal repeated over m lines as a view (m, *shape)."""
    return primal.unsqueeze(0).expand((m, *primal.shape))


def _scores(q0, k0, cq: Coeffs, ck: Coeffs, scale: float, m: int) -> Coeffs:
    """S_k = c Σ_{i+j=k} q_i k_jᵀ, k = 1..K (None where no pair moves)."""
    K = len(cq)
    qs = [_lines(q0, m)] + list(cq)
    ks = [_lines(k0, m)] + list(ck)
    top_q, top_k = _prefix(qs), _prefix(ks)
    if top_q is not None and top_k is not None:  # q_0..q_a and k_0..k_b move (a cut top is
        d = q0.size(-1)  # None): two concatenations, [c q_0 … c q_a] and [k_b … k_0]; S_k is a
        left = torch.cat(qs[: top_q + 1], dim=-1).mul_(scale)  # slice of one times a slice
        right = torch.cat(ks[top_k::-1], dim=-1)  # of the other
        out: Coeffs = []
        for k in range(1, K + 1):
            lo, hi = max(0, k - top_k), min(k, top_q)  # the pairs (i, k - i), lo <= i <= hi
            if lo > hi:
                out.append(None)
                continue
            shift = top_k - k
            out.append(torch.matmul(left[..., lo * d : (hi + 1) * d],
                                    right[..., (shift + lo) * d : (shift + hi + 1) * d].mT))  # fmt: skip
        return out
    out = []
    for k in range(1, K + 1):
        pairs = [(i, k - i) for i in range(k + 1) if qs[i] is not None and ks[k - i] is not None]
        if not pairs:
            out.append(None)
            continue
        left = torch.cat([qs[i] for i, _ in pairs], dim=-1).mul_(scale)
        right = torch.cat([ks[j] for _, j in pairs], dim=-1)
        out.append(torch.matmul(left, right.transpose(-2, -1)))
    return out


def _prefix(coefficients: Coeffs) -> int | None:
    """a where exactly coefficients 0..a are given (the rest None), else None."""
    given = [c is not None for c in coefficients]
    top = given.index(False) - 1 if False in given else len(given) - 1
    return top if not any(given[top + 1 :]) else None


def _weights(P0: torch.Tensor, E: Coeffs) -> Coeffs:
    """P_k = Σ_j r_j G_{k-j} (module docstring) from E_k = [exp(Σ S_k t^k)]_k, written into
    the blocks of E (this rule's own tensors): G_k = P_0 ⊙ E_k in place, then P_k from the
    highest k down, so that the lower G are read before they are overwritten. One (L × L)
    stack per order is held, not three (a pass's blocks of attention are sized for that:
    `hos._attention.BLOCK_SCORES`)."""
    K = len(E)
    G = [None if e is None else e.mul_(P0) for e in E]
    z = [None if g is None else g.sum(-1, keepdim=True) for g in G]
    r: Coeffs = []  # 1/Z(t): r_k = -Σ_{j=1..k} z_j r_{k-j}
    for k in range(1, K + 1):
        acc = None
        for j in range(1, k + 1):
            if z[j - 1] is None or (j < k and r[k - j - 1] is None):
                continue
            term = z[j - 1] if j == k else z[j - 1] * r[k - j - 1]
            acc = -term if acc is None else acc - term
        r.append(acc)
    P: Coeffs = [None] * K
    for k in range(K, 0, -1):
        acc = G[k - 1]
        for j in range(1, k + 1):
            g = P0 if j == k else G[k - j - 1]
            if r[j - 1] is not None and g is not None:
                acc = r[j - 1] * g if acc is None else acc.addcmul_(r[j - 1], g)
        P[k - 1] = acc
    return P


def _outputs(P0, v0, P: Coeffs, cv: Coeffs, m: int) -> Coeffs:
    """O_k = Σ_{i+j=k} P_i v_j, k = 1..K (None where no pair moves)."""
    K = len(P)
    terms: list[list[torch.Tensor]] = [[] for _ in range(K)]
    moving = [j for j in range(1, K + 1) if cv[j - 1] is not None]
    if moving:  # P_0 v_j: lines and orders folded into the columns of one product with P_0
        stacked = torch.stack([cv[j - 1] for j in moving])  # (n, m, ..., L_k, d_v)
        n, d = len(moving), stacked.shape[-1]
        cols = stacked.movedim((0, 1), (-3, -2)).reshape(*v0.shape[:-1], n * m * d)
        products = torch.matmul(P0, cols).unflatten(-1, (n, m, d)).movedim((-3, -2), (0, 1))
        for index, j in enumerate(moving):
            terms[j - 1].append(products[index])
    vs = [_lines(v0, m)] + list(cv)
    for i in range(1, K + 1):  # P_i [v_0 … v_{K-i}]: one product per moving P_i
        if P[i - 1] is None:
            continue
        js = [j for j in range(K - i + 1) if vs[j] is not None]
        if len(js) == 1 and js[0] == 0:
            terms[i - 1].append(torch.matmul(P[i - 1], v0))
            continue
        products = torch.matmul(P[i - 1], torch.cat([vs[j] for j in js], dim=-1))
        for part, j in zip(products.split(v0.shape[-1], dim=-1), js):
            terms[i + j - 1].append(part)
    out: Coeffs = []
    for parts in terms:
        total = parts[0] + parts[1] if len(parts) > 1 else (parts[0] if parts else None)
        for part in parts[2:]:
            total.add_(part)
        out.append(total)
    return out


def attention_coefficients(
    q0, k0, v0, P0, cq: Coeffs, ck: Coeffs, cv: Coeffs, scale: float
) -> Coeffs:
    """The coefficients O_1..O_K of attention (module docstring) on m lines.

    q0 (..., L_q, d), k0 (..., L_k, d), v0 (..., L_k, d_v), P0 (..., L_q, L_k) the primal
    weights (masks applied); cq, ck, cv: lists of K blocks (m, *primal shape) or None (0).
    """
    m = next(c.shape[0] for c in (*cq, *ck, *cv) if c is not None)
    E = exp_series(_scores(q0, k0, cq, ck, scale, m))  # the scores' blocks go with the call
    return _outputs(P0, v0, _weights(P0, E), cv, m)


def _plain(tracker: UnivariateTracker, tensors) -> bool:
    """Whether the call is one `follow_attention` takes (else the written-out ops run, and the
    engine's gate decides what it decides for them: a `no_grad` block, autocast, a transform)."""
    if (
        tracker.pairs
        or tracker._depth
        or not tracker.following()
        or not torch.is_grad_enabled()
        or any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
        or _context_refusal(list(tensors[:3]), {0: None}) is not None
    ):
        return False
    q, k, v = tensors[:3]
    dtype = q.dtype
    return (
        q.dim() >= 2
        and k.dtype == dtype
        and v.dtype == dtype
        and q.dim() == k.dim() == v.dim()
        and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
        and q.size(-1) == k.size(-1)
        and k.size(-2) == v.size(-2)
    )


def follow_attention(
    tracker: UnivariateTracker,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """softmax(c q kᵀ + mask) v with its coefficients stored on the tracker, or None to
    decline (the caller then runs the written-out ops under the tracker).

    `weights(q, k)` computes the primal weights exactly as the written-out ops do (masks,
    causal, rows masked whole), so the value is theirs; `mask` only needs to be constant.
    """
    with torch._C.DisableTorchFunction():  # its own checks are no calls of the model
        return _follow(tracker, (query, key, value), weights, scale, mask)


def _follow(tracker, tensors, weights, scale, mask) -> torch.Tensor | None:
    if not _plain(tracker, (*tensors, mask)) or tracker.jet(mask) is not None:
        return None
    jets = {i: j for i, t in enumerate(tensors) if (j := tracker.jet(t)) is not None}
    if not jets:
        return None
    if any(j.mixed is not None for j in jets.values()) or any(
        c is not None and (c.dtype != t.dtype or c.shape != (len(jets[i].groups), *t.shape))
        for i, t in enumerate(tensors) if i in jets for c in jets[i].coeffs
    ):  # fmt: skip
        return None  # a broadcast block, another precision
    groups = J.union(j.groups for j in jets.values())
    K = tracker.order
    # on the union of the lines (separate q, k, v projections): zero rows where one is still
    coeffs = [
        [None if jets[i].coeffs[k] is None else J.aligned(jets[i], groups, k, t) for k in range(K)]
        if i in jets else [None] * K
        for i, t in enumerate(tensors)
    ]  # fmt: skip
    with torch.no_grad():
        q0, k0, v0 = (t.detach() for t in tensors)
        P0 = weights(q0, k0)  # PyTorch's own errors (a mask of the wrong shape) as written out
        out = torch.matmul(P0, v0)
        try:
            result = attention_coefficients(q0, k0, v0, P0, *coeffs, scale)
        except Exception as exc:  # a bug in this rule: loud under strict, else the exact fallback
            if strict():
                raise RuntimeError("hos: bug in the univariate Taylor rule for attention") from exc
            tracker.fail(TaylorFallback(f"attention: {type(exc).__name__}: {exc}"))  # raises
    tracker.ops.append((F.scaled_dot_product_attention, tuple(jets)))
    _count(tracker, P0, len(groups))
    try:
        tracker._store(out, Jet(groups, result))
    except TaylorFallback as exc:  # past the memory cap: the engine's protocol (raises)
        tracker.fail(exc)
    tracker._note_dtype(F.scaled_dot_product_attention, out.dtype)
    return out


def _count(tracker: UnivariateTracker, P0: torch.Tensor, m: int) -> None:
    """What the call held, as the tracker counts a pass's memory (what sizes its chunks,
    `hos.backends.passes.next_chunk`): the scores and weights as moving activations, and at its
    peak (`exp_series` of the scores) 2K − 1 stacks of (L × L) coefficients over the lines
    beside the coefficients stored."""
    size = P0.numel() * P0.element_size()
    tracker.primal_bytes += 2 * size
    held = tracker.bytes + (2 * tracker.order - 1) * m * size
    tracker.peak_bytes = max(tracker.peak_bytes, held)

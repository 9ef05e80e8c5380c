r"""The Hessian's spectrum on hos's exact Hessian-vector products: sharpness and where it lives.

For a loss $L(\theta)$ with $P$ parameters, $H = \nabla^2 L(\theta)$, and for a partition into
groups $T_1, \dots, T_S$ its diagonal blocks $H_{ss}$:

* `hessian_eigenpairs`: the top-k eigenpairs of $H$ (or of each $H_{ss}$) by implicitly
  restarted Lanczos (scipy's `eigsh` on a `LinearOperator`), or exactly from the dense matrix
  ($P$ products) when $P$ is small;
* `hessian_trace`: $\operatorname{tr} H_{ss}$ for every group by Hutch++ (a sketch $Q$ of the
  range, $\operatorname{tr}(Q^\top P_s H Q)$ exactly, Hutchinson on the rest:
  $\operatorname{tr}(P_s H (I - QQ^\top))$ estimated by $z^\top P_s H (I - QQ^\top) z$ with
  Rademacher $z$), with its standard error; exact when $P$ is no more than the budget;
* `hessian_density` (`hos._density`): the spectral density $p(\lambda) = \frac1P \sum_i \delta(\lambda - \lambda_i)$
  by stochastic Lanczos quadrature (scipy's `eigh_tridiagonal` for the quadrature), smoothed;
* `sharpness` (`hos._sharpness`): $\lambda_{\max}$ and its eigenvector $v$, $\lambda_{\max}$ split into group pairs
  ($\bar H_{st} = v_s^\top H_{st} v_t$ along $v$, whose entries sum to $\lambda_{\max}$), the cubic
  coefficient $D^3L[v, v, v]$, and the gradient of the sharpness
  $\nabla\lambda_{\max} = D^3L[v, v, \cdot]$ (defined for a simple top eigenvalue).

A Hessian-vector product is one more backward pass through the graph of the gradient (built once
per batch and kept), computed under `hos.ExactOps` like every summary, so fused kernels whose
PyTorch double backward is wrong are decomposed first. Over several batches (`losses` a list) the
products are weighted by the batches' sizes; under torch.distributed each product is summed over
the ranks (data parallel), so every rank runs the same iteration and gets the same answer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from hos._collective import all_reduce_sum, rank_weight, world_size
from hos._exact import ExactOps, second_order_reverse
from hos._partition import Partition
from hos._sharded import is_sharded
from hos._validate import check_int, check_params, check_partition, checked_loss

__all__ = ["Eigenpairs", "HessianOperator", "Trace", "hessian_eigenpairs", "hessian_trace"]

log = logging.getLogger("hos")

Params = Mapping[str, torch.Tensor]
#: below this many parameters (of the whole model or of a block) the matrix is formed from P
#: Hessian-vector products and diagonalised exactly: Lanczos would take about as many
DENSE_LIMIT = 64
#: up to this many batch losses keep their gradient graphs between products (more: rebuilt)
KEEP_LIMIT = 8


class HessianOperator:
    r"""$v \mapsto Hv$ for the parameters `names` (all of them, or one group's block), on flat
    float64 NumPy vectors; counts its products in `products`.

    Args:
        losses: one loss `dict -> scalar`, or a list of batch losses (their Hessians are
            averaged with the weights `hos._collective.rank_weight` gives: sample counts for
            mean-reduced `hos.model_loss`).
        params: θ.
        names: the parameters the operator acts on (default: all); the others stay at θ.
        keep_graph: keep each batch's gradient graph between products (fast; memory of one
            gradient graph per batch). Default: for up to `KEEP_LIMIT` batches.
    """

    def __init__(
        self,
        losses,
        params: Params,
        names: Sequence[str] | None = None,
        keep_graph: bool | None = None,
    ):
        self.losses = list(losses) if isinstance(losses, list | tuple) else [losses]
        self.theta = {k: v.detach() for k, v in params.items()}
        self.names = list(self.theta) if names is None else list(names)
        self.shapes = [self.theta[n].shape for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)
        first = self.theta[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.keep = len(self.losses) <= KEEP_LIMIT if keep_graph is None else bool(keep_graph)
        self._graphs: dict[int, tuple] = {}
        self.products = 0
        weights = [rank_weight(loss) for loss in self.losses]
        #: each batch loss's weight (`hos._collective.rank_weight`: its samples for a mean)
        self.weights = [w for w, _ in weights]
        self._mean = all(mean for _, mean in weights)

    # -- flat vectors <-> parameter dicts
    def unflatten(self, flat) -> dict[str, torch.Tensor]:
        """A flat vector (NumPy or torch) as a dict of tensors shaped like the parameters."""
        t = torch.as_tensor(np.asarray(flat), dtype=self.dtype, device=self.device)
        parts = torch.split(t, self.sizes)
        return {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        flat = torch.cat([tensors[n].detach().reshape(-1) for n in self.names])
        return flat.to(torch.float64).cpu().numpy()

    # -- products
    def _gradient_graph(self, index: int):
        if index in self._graphs:
            return self._graphs[index]
        leaves = {n: self.theta[n].clone().requires_grad_() for n in self.names}
        full = {**self.theta, **leaves}
        with ExactOps(), second_order_reverse():  # differentiated twice: fused norms are right
            value = self.losses[index](full)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=True,
                                    allow_unused=True)  # fmt: skip
        graph = (list(leaves.values()), grads)
        if self.keep:
            self._graphs[index] = graph
        return graph

    def hvp_tensors(self, vector: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """H v with v a dict over `names`, as a list of tensors (the batches' weighted mean,
        summed over the ranks)."""
        total: list[torch.Tensor | None] = [None] * len(self.names)
        for index, weight in enumerate(self.weights):
            leaves, grads = self._gradient_graph(index)
            live = [(g, vector[n]) for g, n in zip(grads, self.names) if g is not None]
            if not live:
                continue
            outs = torch.autograd.grad(
                [g for g, _ in live], leaves, grad_outputs=[v for _, v in live],
                retain_graph=self.keep, allow_unused=True,
            )  # fmt: skip
            for k, out in enumerate(outs):
                if out is None:
                    continue
                out = out.detach()
                total[k] = out * weight if total[k] is None else total[k].add_(out, alpha=weight)
        total = [
            torch.zeros(s, dtype=self.dtype, device=self.device) if t is None else t
            for t, s in zip(total, self.shapes)
        ]
        self.products += 1
        return self.combined(total)

    def combined(self, weighted: list[torch.Tensor]) -> list[torch.Tensor]:
        """Σ_batches weight · value (this rank's, as `weights` says) → the quantity of all the
        ranks' batches: summed over the ranks, divided by the total weight for a mean."""
        weight = torch.tensor(sum(self.weights), dtype=weighted[0].dtype, device=self.device)
        if world_size() > 1:  # data parallel: every rank's batches
            *weighted, weight = all_reduce_sum([*weighted, weight])
        return [t / weight for t in weighted] if self._mean else list(weighted)

    def apply(self, flat: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector on the parameters' device, in the parameters' dtype."""
        parts = torch.split(flat.to(self.dtype), self.sizes)
        vector = {n: p.reshape(s) for n, p, s in zip(self.names, parts, self.shapes)}
        return torch.cat([o.reshape(-1) for o in self.hvp_tensors(vector)])

    def matvec(self, flat: np.ndarray) -> np.ndarray:
        """H v on float64 NumPy vectors (scipy's side)."""
        vector = torch.as_tensor(np.ravel(flat), dtype=torch.float64, device=self.device)
        return self.apply(vector).to(torch.float64).cpu().numpy()

    def dense(self) -> np.ndarray:
        """The matrix, one product per column (symmetrised)."""
        eye = np.eye(self.size)
        matrix = np.stack([self.matvec(eye[:, j]) for j in range(self.size)], axis=1)
        return 0.5 * (matrix + matrix.T)

    def linear_operator(self):
        sparse, _ = _scipy_linalg("hessian_eigenpairs")
        return sparse.LinearOperator((self.size, self.size), matvec=self.matvec, dtype=np.float64)


@dataclasses.dataclass
class Eigenpairs:
    """Eigenvalues (descending for `which="LA"`, by modulus for `"LM"`) and eigenvectors as
    parameter dicts of unit norm (over the parameters they live on)."""

    values: torch.Tensor
    vectors: list[dict[str, torch.Tensor]]
    #: "dense" (the matrix from P products, `numpy.linalg.eigh`) or "lanczos" (scipy `eigsh`)
    method: str
    #: how many Hessian-vector products it took
    products: int


@dataclasses.dataclass
class Trace:
    """Per-group traces of the Hessian's diagonal blocks, their standard errors (0 when exact)."""

    names: tuple[str, ...]
    values: torch.Tensor
    stderr: torch.Tensor
    #: "exact" (P products) or "hutch++"
    method: str
    products: int

    @property
    def total(self) -> float:
        """tr H: the sum of the blocks' traces."""
        return float(self.values.sum())


def _scipy_linalg(what: str):
    """scipy.sparse.linalg and scipy.linalg, or a clear error naming the extra."""
    try:
        import scipy.linalg
        import scipy.sparse.linalg
    except ImportError as err:
        raise ImportError(
            f"hos.{what} uses scipy's Lanczos (eigsh) and tridiagonal solver: "
            "pip install 'hos[spectrum]' (or scipy)."
        ) from err
    return scipy.sparse.linalg, scipy.linalg


def _losses_of(loss) -> list:
    items = list(loss) if isinstance(loss, list | tuple) else [loss]
    if not items:
        raise ValueError("loss: an empty list of batch losses; pass at least one loss.")
    return [checked_loss(item) for item in items]


def _checked(loss, params, what: str) -> tuple[list, dict]:
    params = check_params(params)
    if is_sharded(params):
        raise NotImplementedError(
            f"hos.{what}: DTensor (FSDP2 / tensor-parallel) parameters are not supported yet; "
            "data parallel is (every rank its own batch, products summed over the ranks)."
        )
    return _losses_of(loss), params


def _solve(op: HessianOperator, k: int, which: str, tol: float, seed: int) -> Eigenpairs:
    """The k eigenpairs of one operator, densely or by Lanczos."""
    if op.size <= max(DENSE_LIMIT, k + 1):
        values, vectors = np.linalg.eigh(op.dense())
        order = np.argsort(-values if which == "LA" else -np.abs(values), kind="stable")[:k]
        values, vectors, method = values[order], vectors[:, order], "dense"
    else:
        eigsh = _scipy_linalg("hessian_eigenpairs")[0].eigsh
        start = np.random.default_rng(seed).standard_normal(op.size)  # the same on every rank
        values, vectors = eigsh(op.linear_operator(), k=k, which=which, tol=tol, v0=start)
        order = np.argsort(-values if which == "LA" else -np.abs(values), kind="stable")
        values, vectors, method = values[order], vectors[:, order], "lanczos"
    for j in range(vectors.shape[1]):  # a sign convention: the largest entry positive
        if vectors[np.argmax(np.abs(vectors[:, j])), j] < 0:
            vectors[:, j] = -vectors[:, j]
    out_values = torch.as_tensor(values.copy(), dtype=op.dtype, device=op.device)
    out_vectors = [op.unflatten(vectors[:, j].copy()) for j in range(vectors.shape[1])]
    return Eigenpairs(out_values, out_vectors, method, op.products)


def hessian_eigenpairs(
    loss,
    params: Params,
    k: int = 1,
    *,
    which: str = "LA",
    partition: Partition | None = None,
    tol: float = 0.0,
    seed: int = 0,
) -> Eigenpairs | dict[str, Eigenpairs]:
    r"""The top-k eigenvalues and eigenvectors of the Hessian $\nabla^2 L(\theta)$.

    Args:
        loss: a pure loss `dict -> scalar` (e.g. `hos.model_loss`), or a list of batch losses
            (their mean Hessian, weighted by the batches' sizes). Under torch.distributed every
            rank passes its own batches and gets the eigenpairs of all ranks' data.
        params: θ, a dict of tensors (`dict(model.named_parameters())`).
        k: how many eigenpairs.
        which: `"LA"` the algebraically largest (sharpness), `"LM"` the largest in modulus
            (negative curvature included).
        partition: give one to get the eigenpairs of each group's diagonal block $H_{ss}$,
            as a dict by group name.
        tol: relative accuracy of Lanczos (0: machine precision); the dense path is exact.
        seed: Lanczos' start vector (the same on every rank).

    Returns:
        `Eigenpairs` (values, vectors as parameter dicts, method, products), or a dict of them by
        group name.

    Examples:
        >>> import torch, hos
        >>> a = torch.tensor([3.0, 1.0], dtype=torch.float64)
        >>> loss = lambda p: 0.5 * (a * p["w"] ** 2).sum()
        >>> hos.hessian_eigenpairs(loss, {"w": torch.zeros(2, dtype=torch.float64)}).values
        tensor([3.], dtype=torch.float64)
    """
    losses, params = _checked(loss, params, "hessian_eigenpairs")
    if which not in ("LA", "LM"):
        raise ValueError(
            f"which={which!r}: pass 'LA' (largest eigenvalues: the sharpness) or 'LM' (largest "
            "in modulus: the most curved directions, negative ones included)."
        )
    k = check_int("k", k, 1, "the number of eigenpairs, e.g. k=1 for the sharpness")
    if partition is None:
        total = sum(v.numel() for v in params.values())
        if k > total:
            raise ValueError(f"k={k} but the Hessian has only {total} rows; pass k <= {total}.")
        return _solve(HessianOperator(losses, params), k, which, tol, seed)
    partition = check_partition(partition, params)
    out = {}
    for name, group in zip(partition.names, partition.groups):
        op = HessianOperator(losses, params, names=group)
        out[name] = _solve(op, min(k, op.size), which, tol, seed)
    return out


def hessian_trace(
    loss,
    params: Params,
    *,
    partition: Partition | None = None,
    budget: int = 100,
    seed: int = 0,
) -> Trace:
    r"""$\operatorname{tr} H_{ss}$ for every group $s$ (one group of all parameters by default).

    Exact ($P$ Hessian-vector products, one per coordinate) when $P \le$ `budget`; otherwise
    Hutch++ with `budget` products in all: a third sketch the range ($Q$ from $HS$, $S$
    Rademacher), whose part is taken exactly, and the rest estimates the remainder by Hutchinson
    with the block's coordinates masked — every product serves all groups at once. The standard
    error is that of the Hutchinson part (`stderr`).

    Args:
        loss: a loss, or a list of batch losses (see `hessian_eigenpairs`).
        params: θ.
        partition: the groups (default: all parameters one group).
        budget: the number of Hessian-vector products (at least 3).
        seed: the random vectors (the same on every rank).

    Examples:
        >>> import torch, hos
        >>> loss = lambda p: (p["w"] ** 2).sum() + p["b"].prod()
        >>> params = {"w": torch.ones(3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
        >>> hos.hessian_trace(loss, params, partition=hos.Partition.per_tensor(params)).values
        tensor([6., 0.], dtype=torch.float64)
    """
    losses, params = _checked(loss, params, "hessian_trace")
    budget = check_int("budget", budget, 3, "the number of Hessian-vector products, e.g. 100")
    partition = (
        Partition(names=("all",), groups=(tuple(params),))
        if partition is None
        else check_partition(partition, params)
    )
    op = HessianOperator(losses, params)
    S = len(partition)
    owner = _group_of_each_coordinate(op, partition)
    # per-group sums in float64; the vectors in the parameters' dtype (no conversion per product)
    sums = lambda v: torch.bincount(owner, weights=v.to(torch.float64), minlength=S)  # noqa: E731
    as_float64 = {"dtype": torch.float64, "device": op.device}
    work = {"dtype": op.dtype, "device": op.device}
    if op.size <= budget:
        diag = torch.empty(op.size, **as_float64)
        unit = torch.zeros(op.size, **work)
        for j in range(op.size):
            unit[j] = 1.0
            diag[j] = op.apply(unit)[j]
            unit[j] = 0.0
        values, stderr, method = sums(diag), torch.zeros(S, **as_float64), "exact"
    else:
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same on every rank

        def rademacher(k):
            signs = torch.randint(0, 2, (k, op.size), generator=gen, dtype=op.dtype)
            return signs.mul_(2.0).sub_(1.0).to(op.device)

        sketch = budget // 3
        rest = budget - 2 * sketch if sketch else budget
        if sketch:
            sketched = torch.stack([op.apply(row) for row in rademacher(sketch)])
            q = torch.linalg.qr(sketched.T).Q.T  # orthonormal rows spanning H S
            hq = torch.stack([op.apply(row) for row in q])
            exact_part = sums((q * hq).sum(0))  # Σ_j q_j ∘ (H q_j), per group
        else:
            q, exact_part = torch.zeros(0, op.size, **work), torch.zeros(S, **as_float64)
        z = rademacher(rest)
        residual = z - (z @ q.T) @ q
        samples = torch.stack([sums(zj * op.apply(rj)) for zj, rj in zip(z, residual)])
        values = exact_part + samples.mean(0)
        stderr = (
            samples.std(0, correction=1) / math.sqrt(rest)
            if rest > 1
            else torch.full((S,), math.inf, **as_float64)
        )
        method = "hutch++" if sketch else "hutchinson"
    return Trace(partition.names, values.to(op.dtype), stderr.to(op.dtype), method, op.products)


def _group_of_each_coordinate(op: HessianOperator, partition: Partition) -> torch.Tensor:
    """The group index of each flat coordinate (P integers, for per-group sums)."""
    group_of = {name: s for s, group in enumerate(partition.groups) for name in group}
    return torch.cat([
        torch.full((size,), group_of[name], dtype=torch.long, device=op.device)
        for name, size in zip(op.names, op.sizes)
    ])  # fmt: skip

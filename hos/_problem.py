r"""One summary's inputs, validated once and shared by every backend and the oracle.

A `Problem` holds the loss L, the point θ, the direction u (both detached, finite,
in the compute dtype) and the S groups; every backend computes the derivatives of
$\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)$ from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from hos._partition import Partition
from hos._sharded import Layout, copies, for_backends, is_sharded, layout
from hos._validate import check_summary_args

__all__ = ["Problem"]

Params = Mapping[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


class Problem:
    """The inputs of one summary: loss, θ, u, the groups, and whether to run the
    Taylor-mode certificate (`hos.backends.certificate`).

    Build it with `validated` from user input; the constructor trusts its arguments
    (tests and internal line problems use it directly).
    """

    def __init__(
        self,
        loss: LossFn,
        params: Params,
        direction: Params,
        partition: Partition,
        verify: bool = True,
    ):
        self.loss = loss
        self.verify = verify
        self.partition = partition
        self.theta = dict(params)
        self.u = dict(direction)
        self.groups = partition.groups
        self.names = partition.names
        self.S = len(partition)
        first = next(iter(self.theta.values()))
        self.dtype, self.device = first.dtype, first.device
        #: the `hos._sharded.Layout` of a sharded model's θ and u, None for an unsharded one
        self.sharded: str | None = None
        #: how many ranks hold this rank's batch (the tensor-parallel mesh's size), 1 otherwise
        self.copies = 1
        #: a sharded model's θ and u as the user passed them (DTensors laid out like the
        #: parameters), for the check against the model run the ordinary way; None otherwise
        self.placed: tuple[dict, dict] | None = None

    @classmethod
    def validated(
        cls, loss, params, direction, partition, *, order: int | None = None, what: str = "",
        verify: bool = True, stacklevel: int = 5,
    ) -> Problem:  # fmt: skip
        """Check the user's arguments (see `hos._validate.check_summary_args`)."""
        if not isinstance(verify, bool):
            raise TypeError(
                f"verify must be True or False, got {verify!r}; True (the default) checks "
                "Taylor mode against one gradient per new op sequence, False skips that check."
            )
        sharded = layout(loss, params) if is_sharded(params) or is_sharded(direction) else None
        replicas, placed = 1, None
        if sharded:
            replicas = copies(getattr(getattr(loss, "wrapped", loss), "model", None), params)
            placed = (dict(params), dict(direction))
            if sharded == Layout.TENSOR_PARALLEL:  # FSDP2: the shards, gathered layer by layer
                params, direction = for_backends(loss, params), for_backends(loss, direction)
        loss, theta, u, partition = check_summary_args(
            loss, params, direction, partition, order=order, what=what, stacklevel=stacklevel
        )
        prob = cls(loss, theta, u, partition, verify=verify)
        prob.sharded, prob.copies, prob.placed = sharded, replicas, placed
        return prob

    @property
    def numel(self) -> int:
        """The number of parameters."""
        return sum(v.numel() for v in self.theta.values())

    def names_of(self, groups: Sequence[int]) -> list[str]:
        """The parameter names in `groups`."""
        return [n for k in groups for n in self.groups[k]]

    def group_names(self, groups: Sequence[int]) -> list[str]:
        """The names of the groups `groups`."""
        return [self.names[s] for s in groups]

    def contract(self, grads: Params, groups: Sequence[int]) -> torch.Tensor:
        """[Σ_{p∈T_k} u_p grads_p for k in groups] as a vector."""
        return torch.stack(
            [sum((grads[n] * self.u[n]).sum() for n in self.groups[k]) for k in groups]
        )

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def along_line(self, weights: dict[int, float]) -> Problem:
        """The same loss along one line: direction Σ_s w_s u_s, all parameters one group."""
        u = {
            n: self.u[n] * weights.get(s, 0.0) for s, names in enumerate(self.groups) for n in names
        }
        line = Partition(names=("line",), groups=(tuple(self.theta),))
        return Problem(self.loss, self.theta, u, line, verify=False)

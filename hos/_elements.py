r"""Per-element groups: one scalar parameter per element of chosen tensors.

A [`hos.Partition`][hos.Partition] groups whole tensors. To study curvature *inside* a
tensor (e.g. the channels of a BatchNorm γ), [`split_elements`][hos.split_elements] rewrites
the loss so that each element of the chosen tensors is its own 0-d parameter,
named `"bn.weight[3]"` (`"conv.weight[0,1,2,2]"` for several dims). Then
`Partition.per_tensor(params2)` has one group per element and, with the
direction u = 1 on those elements, the order-2 summary restricted to them is
exactly the Hessian block of the original tensor:

$$
\bar H_{ij} = u_i u_j\,\partial^2 L/\partial\theta_i\partial\theta_j = H_{ij} \quad (u = 1).
$$
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = ["element_names", "split_elements"]

Params = Mapping[str, torch.Tensor]
LossFn = Callable[[Params], torch.Tensor]


def element_names(name: str, shape: Iterable[int]) -> list[str]:
    """The names of the elements of tensor `name` of `shape`, in row-major order.

    Examples:
        >>> element_names("bn.weight", (3,))
        ['bn.weight[0]', 'bn.weight[1]', 'bn.weight[2]']
        >>> element_names("w", (1, 2))
        ['w[0,0]', 'w[0,1]']
        >>> element_names("s", ())
        ['s[]']
    """
    ranges = [range(int(n)) for n in shape]
    return [f"{name}[{','.join(str(i) for i in index)}]" for index in itertools.product(*ranges)]


def split_elements(
    loss: LossFn, params: Params, names: Iterable[str]
) -> tuple[LossFn, dict[str, torch.Tensor]]:
    r"""Replace each tensor in `names` by one 0-d parameter per element.

    Returns `(loss2, params2)`: `params2` keeps the order of `params`,
    with each named tensor replaced in place by its elements (see
    [`element_names`][hos.element_names]; values are detached copies), and `loss2` is the
    pure function that stacks the elements back into their tensors and calls
    `loss`, so `loss2(params2) == loss(params)` and every derivative of
    `loss2` with respect to an element is the matching derivative of
    `loss`. `loss2` uses only `stack`/`reshape` and is safe under
    `torch.func`.

    Examples:
        The Hessian block of a tensor as an order-2 summary:

        >>> import torch, hos
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> loss = lambda p: 0.5 * p["w"] @ A @ p["w"] + p["b"].sum()
        >>> params = {"w": torch.ones(2, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
        >>> loss2, params2 = hos.split_elements(loss, params, ["w"])
        >>> list(params2)
        ['w[0]', 'w[1]', 'b']
        >>> u = {k: torch.ones_like(v) for k, v in params2.items()}
        >>> H = hos.summary_tensor(loss2, params2, u, hos.Partition.per_tensor(params2), order=2)
        >>> H[:2, :2]
        tensor([[2., 1.],
                [1., 3.]], dtype=torch.float64)
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a dict[str, Tensor], got {type(params).__name__}; pass "
            "dict(model.named_parameters())."
        )
    if not callable(loss):
        raise TypeError(f"loss must be callable (a pure function of a dict), got {loss!r:.60}.")
    if isinstance(names, str):
        raise TypeError(f"names is the string {names!r}; give a list of names, e.g. [{names!r}].")
    split = list(dict.fromkeys(names))
    if not split:
        raise ValueError("names is empty; name at least one tensor of params to split.")
    for name in split:
        if name not in params:
            raise KeyError(
                f"names holds {name!r}, which is not in params; choose among {list(params)}."
            )
        if params[name].numel() == 0:
            raise ValueError(
                f"params[{name!r}] has no elements (shape {tuple(params[name].shape)})."
            )
    shapes = {name: tuple(params[name].shape) for name in split}
    elements = {name: element_names(name, shapes[name]) for name in split}
    params2: dict[str, torch.Tensor] = {}
    for key, value in params.items():
        if key in shapes:
            flat = value.detach().reshape(-1)
            for element, entry in zip(elements[key], flat):
                if element in params:
                    raise ValueError(
                        f"params already holds a tensor named {element!r}; rename it before "
                        f"splitting {key!r}."
                    )
                params2[element] = entry.clone()
        else:
            params2[key] = value

    def loss2(p2: Params) -> torch.Tensor:
        merged = {k: v for k, v in p2.items() if k in params}
        for name in split:
            stacked = torch.stack([p2[e] for e in elements[name]])
            merged[name] = stacked.reshape(shapes[name])
        return loss(merged)

    return loss2, params2

"""The partition of the parameters into S named groups T_1..T_S."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hos._labels import readable_labels

__all__ = ["Partition"]

ParamSource = nn.Module | Mapping[str, torch.Tensor]


def _parameter_names(source: ParamSource, argument: str = "model") -> list[str]:
    """Names of the parameters to differentiate, in registration order.

    For a module: the parameters that require grad. For a dict: every entry
    (a dict *is* the user's choice of parameters).
    """
    if isinstance(source, nn.Module):
        return [name for name, p in source.named_parameters() if p.requires_grad]
    if isinstance(source, Mapping):
        for name, value in source.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{argument}[{name!r}] is a {type(value).__name__}, not a Tensor; pass "
                    "dict(model.named_parameters()) or the module itself."
                )
        return list(source.keys())
    raise TypeError(
        f"{argument} must be an nn.Module or a dict[str, Tensor], got {type(source).__name__}: "
        f"{source!r:.80}; pass the model or dict(model.named_parameters())."
    )


def _labels(source: ParamSource, names: list[str]) -> tuple[str, ...]:
    """The group names: readable labels for a module's index-only paths, else `names`."""
    if isinstance(source, nn.Module):
        return tuple(readable_labels(source, names))
    return tuple(names)


@dataclass(frozen=True)
class Partition:
    """S named, disjoint, non-empty groups of parameter names covering all parameters.

    A value object: validated once at construction, immutable, hashable.
    `groups[s]` lists the parameter names of group `s` whose name is
    `names[s]`; `len(partition)` is S.

    Examples:
        >>> p = Partition(names=("a", "b"), groups=(("w1", "b1"), ("w2",)))
        >>> len(p), p.group_of("w2")
        (2, 1)
    """

    names: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if isinstance(self.names, str):
            raise TypeError(
                f"Partition: names is the string {self.names!r}; give a tuple of group names, "
                f"e.g. ({self.names!r},)."
            )
        for group in self.groups:
            if isinstance(group, str):
                raise TypeError(
                    f"Partition: a group is the string {group!r}; give each group as a tuple of "
                    f"parameter names, e.g. ({group!r},)."
                )
        names = tuple(self.names)
        groups = tuple(tuple(g) for g in self.groups)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "groups", groups)
        if len(names) != len(groups):
            raise ValueError(
                f"Partition: {len(names)} names but {len(groups)} groups; give one name per group."
            )
        if not names:
            raise ValueError(
                "Partition: no groups; give at least one group (S >= 1), e.g. "
                "Partition.whole(model)."
            )
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(
                    f"Partition: group names must be non-empty strings, got {name!r}; name each "
                    "group with a str."
                )
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(
                f"Partition: duplicate group names {dup}; give each group its own name."
            )
        seen: dict[str, str] = {}
        for name, group in zip(names, groups):
            if not group:
                raise ValueError(
                    f"Partition: group {name!r} is empty; add a parameter to it or remove it "
                    "(every group needs at least one parameter)."
                )
            for param in group:
                if not isinstance(param, str):
                    raise TypeError(
                        f"Partition: group {name!r} holds {param!r}, not a parameter name; use the "
                        "str names of named_parameters()."
                    )
                if param in seen:
                    raise ValueError(
                        f"Partition: parameter {param!r} is in both group {seen[param]!r} and group "
                        f"{name!r}; put each parameter in exactly one group."
                    )
                seen[param] = name

    # ------------------------------------------------------------------ factories
    @classmethod
    def per_tensor(cls, model: ParamSource) -> Partition:
        """One group per parameter tensor, named after it.

        For a module, a name made only of indices (the layers of an `nn.Sequential`) is
        labelled by its layer's kind and rank (`"0.weight"` → `"conv1.weight"`, see
        `readable_labels`); the group still holds the parameter `"0.weight"`.

        Examples:
            >>> import torch.nn as nn
            >>> Partition.per_tensor(nn.Sequential(nn.Linear(2, 3), nn.Tanh())).names
            ('fc1.weight', 'fc1.bias')
        """
        names = _parameter_names(model)
        if not names:
            raise ValueError(
                "Partition.per_tensor: model has no parameter that requires grad; unfreeze some "
                "(p.requires_grad_()) or pass a dict of the tensors to summarise."
            )
        return cls(names=_labels(model, names), groups=tuple((n,) for n in names))

    @classmethod
    def per_layer(cls, model: ParamSource) -> Partition:
        """One group per module that owns parameters directly (weight and bias together),
        named after the module (index-only paths as `per_tensor` labels them: `"conv1"`).

        For a dict, parameters are grouped by their name up to the last dot.

        Examples:
            >>> import torch.nn as nn
            >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2))
            >>> Partition.per_layer(net).names
            ('conv1', 'fc1')
        """
        names = _parameter_names(model)
        if not names:
            raise ValueError(
                "Partition.per_layer: model has no parameter that requires grad; unfreeze some "
                "(p.requires_grad_()) or pass a dict of the tensors to summarise."
            )
        layers: dict[str, list[str]] = {}
        for name in names:
            layer = name.rpartition(".")[0] or "<root>"
            layers.setdefault(layer, []).append(name)
        return cls(
            names=_labels(model, list(layers)), groups=tuple(tuple(v) for v in layers.values())
        )

    @classmethod
    def whole(cls, model: ParamSource, name: str = "all") -> Partition:
        """A single group holding every parameter (S = 1)."""
        names = _parameter_names(model)
        if not names:
            raise ValueError(
                "Partition.whole: model has no parameter that requires grad; unfreeze some "
                "(p.requires_grad_()) or pass a dict of the tensors to summarise."
            )
        return cls(names=(name,), groups=(tuple(names),))

    @classmethod
    def from_groups(
        cls, model: ParamSource, groups: Mapping[str, Sequence[str]], *, rest: str | None = None
    ) -> Partition:
        """Groups given as `{"group name": ["glob", ...]}` over parameter names.

        Each parameter must match the patterns of exactly one group, or of none when `rest`
        names a catch-all group: the parameters no glob matches go there (last). A pattern
        matches a name equal to it or, as an `fnmatch` glob, names it matches (so
        element names such as `"bn.weight[3]"` from [`hos.split_elements`][hos.split_elements]
        can be given literally).

        Examples:
            >>> import torch.nn as nn
            >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
            >>> Partition.from_groups(net, {"hidden": ["0.*"], "out": ["2.*"]}).groups
            (('0.weight', '0.bias'), ('2.weight', '2.bias'))
            >>> Partition.from_groups(net, {"out": ["2.*"]}, rest="rest")
            Partition(names=('out', 'rest'), groups=(('2.weight', '2.bias'), ('0.weight', '0.bias')))
        """
        if not isinstance(groups, Mapping) or not groups:
            raise TypeError(
                f"groups must be a non-empty dict {{name: [glob, ...]}}, got {groups!r:.80}; "
                "e.g. {'all': ['*']}."
            )
        if rest is not None and (not isinstance(rest, str) or not rest or rest in groups):
            raise ValueError(
                f"rest must be a new group name (a non-empty str that is not a key of groups), "
                f"got {rest!r}; e.g. rest='rest'."
            )
        names = _parameter_names(model)
        members: dict[str, list[str]] = {g: [] for g in groups}
        owner: dict[str, str] = {}
        for param in names:
            for gname, patterns in groups.items():
                if isinstance(patterns, str):
                    raise TypeError(
                        f"groups[{gname!r}] is the string {patterns!r}; give a list of globs, "
                        f"e.g. [{patterns!r}]."
                    )
                if any(param == pat or fnmatch.fnmatchcase(param, pat) for pat in patterns):
                    if param in owner:
                        raise ValueError(
                            f"groups: parameter {param!r} matches both {owner[param]!r} and "
                            f"{gname!r}; make the globs disjoint."
                        )
                    owner[param] = gname
                    members[gname].append(param)
        missing = [p for p in names if p not in owner]
        if missing and rest is not None:
            members[rest] = missing
        elif missing:
            more = len(missing) - 6
            shown = f"{missing[:6]}{f' and {more} more' if more > 0 else ''}"
            raise ValueError(
                f"groups: parameters {shown} match no group; add a glob for them, or collect "
                "every unmatched parameter in one group with rest='rest'."
            )
        empty = [g for g, m in members.items() if not m]
        if empty:
            raise ValueError(
                f"groups: {empty} match no parameter; check the globs against "
                f"{names[:6]}{'...' if len(names) > 6 else ''}."
            )
        return cls(names=tuple(members), groups=tuple(tuple(m) for m in members.values()))

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[tuple[str, tuple[str, ...]]]:
        return iter(zip(self.names, self.groups))

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """All parameter names, group by group."""
        return tuple(p for g in self.groups for p in g)

    def group_of(self, parameter: str) -> int:
        """Index of the group that holds `parameter`."""
        for index, group in enumerate(self.groups):
            if parameter in group:
                return index
        raise KeyError(
            f"parameter {parameter!r} is in no group of this partition; its parameters are "
            f"{list(self.parameter_names)[:6]}{'...' if len(self.parameter_names) > 6 else ''}; "
            "use one of those names."
        )

    def check_covers(self, params: Mapping[str, torch.Tensor], argument: str = "params") -> None:
        """Raise unless the partition covers exactly the keys of `params`."""
        covered = set(self.parameter_names)
        keys = set(params)
        missing = [k for k in params if k not in covered]
        extra = [k for k in self.parameter_names if k not in keys]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{argument} has {missing} that no group holds")
            if extra:
                parts.append(f"the partition names {extra} that {argument} lacks")
            raise ValueError(
                "partition does not match " + argument + ": " + "; ".join(parts) + ". Build the "
                "partition from the same parameters, e.g. hos.Partition.per_tensor(params)."
            )

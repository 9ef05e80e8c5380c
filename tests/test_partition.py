"""Partition: factories, queries and validation."""

import pytest
import torch
from torch import nn

import hos

pytestmark = pytest.mark.usefixtures("single_thread")


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False))
    net.add_module("bn", nn.BatchNorm1d(2))
    return net


NAMES = ("0.weight", "0.bias", "2.weight", "bn.weight", "bn.bias")


@pytest.mark.parametrize("source", ["module", "dict"])
def test_per_tensor(source):
    net = _net()
    src = net if source == "module" else dict(net.named_parameters())
    p = hos.Partition.per_tensor(src)
    # a module's index-only paths are labelled by layer kind and rank; a dict keeps its keys
    labels = ("fc1.weight", "fc1.bias", "fc2.weight") if source == "module" else NAMES[:3]
    assert p.names == labels + NAMES[3:]
    assert p.groups == tuple((n,) for n in NAMES)
    assert len(p) == 5 and p.parameter_names == NAMES
    assert [p.group_of(n) for n in NAMES] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("source", ["module", "dict"])
def test_per_layer(source):
    net = _net()
    src = net if source == "module" else dict(net.named_parameters())
    p = hos.Partition.per_layer(src)
    assert p.names == (("fc1", "fc2") if source == "module" else ("0", "2")) + ("bn",)
    assert p.groups == (("0.weight", "0.bias"), ("2.weight",), ("bn.weight", "bn.bias"))
    assert p.group_of("bn.bias") == 2 and len(p) == 3


def test_per_layer_of_root_parameters():
    p = hos.Partition.per_layer({"w": torch.zeros(2), "b": torch.zeros(1), "f.x": torch.zeros(1)})
    assert p.names == ("<root>", "f") and p.groups == (("w", "b"), ("f.x",))


def test_labels_stay_unique_when_a_module_is_already_called_like_one():
    net = nn.Sequential(nn.Linear(2, 2))
    net.add_module("fc1", nn.Linear(2, 2))  # "0" would become fc1 too: both keep their paths
    assert hos.Partition.per_layer(net).names == ("0", "fc1")


def test_whole():
    p = hos.Partition.whole(_net())
    assert len(p) == 1 and p.names == ("all",) and p.groups == (NAMES,)
    assert hos.Partition.whole(_net(), name="theta").names == ("theta",)


def test_from_groups_globs_and_order():
    p = hos.Partition.from_groups(_net(), {"norm": ["bn.*"], "linear": ["0.*", "2.weight"]})
    assert p.names == ("norm", "linear")
    # within a group, parameters keep their registration order
    assert p.groups == (("bn.weight", "bn.bias"), ("0.weight", "0.bias", "2.weight"))


def test_only_parameters_that_require_grad():
    net = _net()
    net[0].bias.requires_grad_(False)
    for factory in (hos.Partition.per_tensor, hos.Partition.per_layer, hos.Partition.whole):
        assert "0.bias" not in factory(net).parameter_names
    p = hos.Partition.from_groups(net, {"all": ["*"]})
    assert p.groups == (tuple(n for n in NAMES if n != "0.bias"),)


def test_value_semantics():
    a, b = hos.Partition.per_tensor(_net()), hos.Partition.per_tensor(_net())
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.names = ("x",)
    assert list(a) == list(zip(a.names, a.groups))
    lists = hos.Partition(names=["a"], groups=[["w"]])
    assert lists.names == ("a",) and lists.groups == (("w",),)


def test_group_of_unknown_parameter():
    with pytest.raises(KeyError, match="nope"):
        hos.Partition.per_tensor(_net()).group_of("nope")


@pytest.mark.parametrize(
    "names, groups, exc, message",
    [
        (("a",), (("w",), ("v",)), ValueError, "1 names but 2 groups"),
        ((), (), ValueError, "at least one group"),
        (("a", "a"), (("w",), ("v",)), ValueError, "duplicate group names"),
        (("",), (("w",),), ValueError, "non-empty strings"),
        (("a", "b"), (("w",), ()), ValueError, "group 'b' is empty"),
        (("a", "b"), (("w", "v"), ("v",)), ValueError, "'v' is in both group 'a' and group 'b'"),
        (("a",), (("w", "w"),), ValueError, "'w' is in both"),
        (("a",), ((3,),), TypeError, "not a parameter name"),
    ],
)
def test_constructor_validation(names, groups, exc, message):
    with pytest.raises(exc, match=message):
        hos.Partition(names=names, groups=groups)


@pytest.mark.parametrize(
    "groups, exc, message",
    [
        ({"lin": ["0.*", "2.*"]}, ValueError, r"\['bn.weight', 'bn.bias'\] match no group"),
        ({"a": ["*"], "b": ["bn.*"]}, ValueError, "'bn.weight' matches both 'a' and 'b'"),
        ({"all": ["*"], "ghost": ["conv.*"]}, ValueError, r"\['ghost'\] match no parameter"),
        ({"all": "*"}, TypeError, "is the string"),
        ({}, TypeError, "non-empty dict"),
        ([("all", ["*"])], TypeError, "non-empty dict"),
    ],
)
def test_from_groups_validation(groups, exc, message):
    with pytest.raises(exc, match=message):
        hos.Partition.from_groups(_net(), groups)


@pytest.mark.parametrize(
    "factory", [hos.Partition.per_tensor, hos.Partition.per_layer, hos.Partition.whole]
)
def test_no_trainable_parameters(factory):
    net = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        factory(net)


def test_bad_sources():
    with pytest.raises(TypeError, match="nn.Module or a dict"):
        hos.Partition.per_tensor([torch.zeros(1)])
    with pytest.raises(TypeError, match=r"model\['w'\] is a list"):
        hos.Partition.per_tensor({"w": [1.0]})


def test_check_covers():
    net = _net()
    p = hos.Partition.per_tensor(net)
    params = dict(net.named_parameters())
    p.check_covers(params)
    with pytest.raises(ValueError, match=r"the partition names \['bn.bias'\]"):
        p.check_covers({k: v for k, v in params.items() if k != "bn.bias"})
    with pytest.raises(ValueError, match=r"has \['extra'\] that no group holds"):
        p.check_covers({**params, "extra": torch.zeros(1)})


def test_from_groups_matches_literal_names_with_glob_characters():
    """Element names from hos.split_elements contain brackets, which fnmatch reads as a class."""
    params = {
        "bn.weight[0]": torch.zeros(()),
        "bn.weight[1]": torch.zeros(()),
        "fc.w": torch.zeros(2),
    }
    p = hos.Partition.from_groups(
        params, {"c0": ["bn.weight[0]"], "c1": ["bn.weight[1]"], "fc": ["fc.*"]}
    )
    assert p.groups == (("bn.weight[0]",), ("bn.weight[1]",), ("fc.w",))


def test_a_rest_group_collects_what_no_glob_matches():
    p = hos.Partition.from_groups(_net(), {"norm": ["bn.*"]}, rest="rest")
    assert p.names == ("norm", "rest")
    assert p.groups == (("bn.weight", "bn.bias"), ("0.weight", "0.bias", "2.weight"))
    with pytest.raises(ValueError, match=r"match no group.*rest='rest'"):
        hos.Partition.from_groups(_net(), {"norm": ["bn.*"]})
    with pytest.raises(ValueError, match=r"rest must be a new group name.*got 'norm'"):
        hos.Partition.from_groups(_net(), {"norm": ["bn.*"]}, rest="norm")

r"""One FSDP2 layer's full weights at a time, in the forward and in every backward.

A summary of an FSDP2 model differentiates $\varphi(\eta) = L(\theta + \sum_s \eta_s u_s)$ up
to three times. Each FSDP unit's forward needs its full weights θ_p and directions u_p, which a
rank holds only as shards; autograd would keep the gathered tensors in the graph (the
weight of every linear map is saved for its input gradient, u_p for ⟨ȳ, u_p⟩), so the graph of a
summary would hold the whole model on every rank. Here:

* the forward gathers one unit's θ_p and u_p (`full`, an all-gather each, no gradient) and
  records each gathered storage with the shard it came from;
* saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`, active while the graph is
  built and during every backward pass through it) store, for a saved tensor on such a storage,
  the shard and the view's geometry instead of the tensor (`pack`), and gather it again when a
  backward pass needs it (`unpack`); autograd reattaches the saved tensor's own history, so
  the nested passes see the dependence on η as before. Tensors unpacked this way are recorded
  too: the graph a backward pass builds for the next order saves them again as shards;
* the last `keep` gathered tensors are reused (a backward pass reads a layer's θ_p and u_p in
  neighbouring nodes), so memory is the shards, the activations and about `keep` layers.

Every rank must unpack in the same order, since each gather is a collective: the ranks run the
same graph (one model, one batch each), which autograd's engine walks in the same order.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["LayerGather", "gathered_to", "laid_out", "local_tensor"]

#: gathered tensors reused across neighbouring unpacks (a linear layer's θ_W, θ_b, u_W, u_b)
KEEP = 4


class _Saved:
    """A saved tensor on a gathered storage, as the shard and the view of the gathered tensor
    (of its local tensor, with the DTensor's layout, for a tensor-parallel weight)."""

    __slots__ = ("cast", "layout", "offset", "shard", "size", "spec", "stride")

    def __init__(self, shard: torch.Tensor, spec, view: torch.Tensor, layout=None, cast=None):
        self.shard, self.spec, self.layout, self.cast = shard, spec, layout, cast
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (this rank's shard, no autograd link), a plain tensor itself."""
    return getattr(tensor, "_local_tensor", tensor)


def gathered_to(shard: torch.Tensor, spec) -> torch.Tensor:
    """The DTensor `shard` as FSDP2 gathers it for a tensor-parallel forward: laid out as
    `spec` (mesh and placements of the tensor-parallel dimension). One all-gather over the
    other mesh dimensions where the meshes name their dimensions, else through the full tensor
    (differentiable either way)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh, names = shard.device_mesh, shard.device_mesh.mesh_dim_names
    inner = spec.mesh.mesh_dim_names
    if not names or not inner or not set(inner) <= set(names):
        return laid_out(shard.full_tensor(), spec.mesh, spec.placements)
    target = [spec.placements[inner.index(n)] if n in inner else Replicate() for n in names]
    partial = shard.redistribute(mesh, target)
    return DTensor.from_local(
        partial.to_local(), spec.mesh, spec.placements, run_check=False,
        shape=partial.shape, stride=partial.stride(),
    )  # fmt: skip


def laid_out(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """The DTensor with `placements` on `mesh` whose full tensor is `full` (the same on every
    rank): a local slice of a replicated DTensor (differentiable)."""
    from torch.distributed.tensor import DTensor, Replicate

    everywhere = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return everywhere.redistribute(mesh, placements)


class LayerGather:
    r"""Full tensors of DTensor shards, gathered one layer at a time and again in backward.

    `moving[name]` (set by the backend) turns a parameter's gathered θ_p and u_p into the
    tensor the forward computes with, e.g. $\theta_p + \eta_s u_p$ at η = 0.
    """

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        #: name -> (u_p's shard, f(θ_p, u_p) -> the weight the forward uses)
        self.moving: dict[str, tuple[torch.Tensor, Callable]] = {}
        #: called with the tensors a unit computed with, after its forward: whoever kept them
        #: lets them go
        self.released: Callable[[list[torch.Tensor]], None] | None = None
        #: storage -> (weak ref, shard, bytes, spec, cast)
        self._recorded: dict[int, tuple] = {}
        self._recent: OrderedDict[int, tuple] = OrderedDict()  # id(shard) -> (shard, gathered)
        #: id(a weight mixed precision cast) -> the weight before the cast, until the unit's
        #: forward is done (`released` forgets the marks of both)
        self.cast_from: dict[int, torch.Tensor] = {}
        #: all-gathers made, and the most bytes of gathered storage alive at one time
        self.gathers = 0
        self.peak_bytes = 0

    # ------------------------------------------------------------------ gathering
    def full(self, shard: torch.Tensor, spec=None) -> torch.Tensor:
        """The DTensor `shard` gathered: its full tensor, or with `spec` (FSDP2's layout of a
        tensor-parallel weight after its gather: mesh and placements) that DTensor; an
        all-gather unless one of the last `keep` was of the same shard. Recorded so that
        autograd saves it as the shard."""
        found = self._recent.pop(id(shard), None)
        if found is None:
            with torch.no_grad():
                whole = shard.full_tensor() if spec is None else gathered_to(shard, spec)
            found = (shard, whole)
            self.gathers += 1
            self._record(whole, shard, spec)
        self._recent[id(shard)] = found
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return found[1]

    def weight(self, name: str, shard: torch.Tensor, spec=None, cast=None) -> torch.Tensor:
        """What the forward computes with for the parameter `name` held as `shard`; `cast`:
        the dtype FSDP2's mixed precision casts it to (the cast is recorded too: at η = 0 it
        is the cast of the gathered θ_p, gathered and cast again when a backward needs it)."""
        theta = self.full(shard, spec)
        entry = self.moving.get(name)
        value = theta if entry is None else entry[1](theta, self.full(entry[0], spec))
        if cast is None or value.dtype == cast:
            return value
        before, value = value, value.to(cast)
        if entry is not None and self.released is not None:
            self.cast_from[id(value)] = before
        self._record(value, shard, spec, cast)
        return value

    def _record(self, gathered: torch.Tensor, shard: torch.Tensor, spec, cast=None) -> None:
        storage = local_tensor(gathered).untyped_storage()
        entry = (StorageWeakRef(storage), shard, storage.nbytes(), spec, cast)
        self._recorded[storage.data_ptr()] = entry
        live = 0
        for key, (ref, _, size, *_) in list(self._recorded.items()):
            if ref.expired():
                del self._recorded[key]
            else:
                live += size
        self.peak_bytes = max(self.peak_bytes, live)

    # ------------------------------------------------------------------ saved tensors
    def pack(self, tensor: torch.Tensor):
        local = local_tensor(tensor)
        if type(local) is not torch.Tensor and not isinstance(local, torch.nn.Parameter):
            return tensor  # another subclass: saved as it is
        if local.layout != torch.strided:
            return tensor
        storage = local.untyped_storage()
        entry = self._recorded.get(storage.data_ptr())
        if entry is None or entry[0].expired() or entry[2] != storage.nbytes():
            return tensor
        layout = None
        if local is not tensor:  # a DTensor: its layout, to rebuild it around the local view
            layout = (tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride())
        return _Saved(entry[1], entry[3], local, layout, entry[4])

    def unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        gathered = self.full(packed.shard, packed.spec)
        if packed.cast is not None:
            with torch.no_grad():
                gathered = gathered.to(packed.cast)
            self._record(gathered, packed.shard, packed.spec, packed.cast)
        view = local_tensor(gathered).as_strided(packed.size, packed.stride, packed.offset)
        if packed.layout is None:
            return view
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = packed.layout
        with torch.no_grad():
            return DTensor.from_local(
                view, mesh, placements, run_check=False, shape=shape, stride=stride
            )

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Saved tensors on gathered storages are kept as shards inside the block."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield

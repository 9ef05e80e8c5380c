"""Model code hos did not write, sharded with FSDP2 on 2 gloo processes (float64): Hugging Face's
GPT-2 (tied input and output embeddings) with one FSDP unit per block, against one process
holding the unsharded model and the union of the ranks' batches."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import hos
from tests.distributed.test_sharded import _free_port
from tests.helpers.ranks import gloo_group, layer_gathers, spawned
from tests.helpers.thirdparty import needs
from tests.helpers.tolerances import RANKS, RANKS_GRADIENT, assert_close

pytestmark = [
    pytest.mark.thirdparty,
    needs("transformers"),
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"
    ),
]

WORLD = 2
GROUPS = {"embed": ["transformer.wte.*", "transformer.wpe.*"], "block0": ["transformer.h.0.*"],
          "block1": ["transformer.h.1.*"], "final": ["transformer.ln_f.*"]}  # fmt: skip


def _next_token(logits, labels):
    """The causal language-model loss, mean over the predicted tokens."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _gpt2(frozen_embeddings: bool = False):
    """A 2-block GPT-2 with random weights (no dropout), 4 sequences of 8 tokens and u (of the
    trainable parameters: with `frozen_embeddings`, the token and position embeddings — the
    token one tied with the output projection — are frozen, as in fine-tuning)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).double()
    if frozen_embeddings:
        model.transformer.wte.weight.requires_grad_(False)
        model.transformer.wpe.weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (2 * WORLD, 8), generator=gen)
    u = {k: 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
         for k, p in model.named_parameters() if p.requires_grad}  # fmt: skip
    groups = {k: v for k, v in GROUPS.items() if not (frozen_embeddings and k == "embed")}
    return model, ids, u, hos.Partition.from_groups(model, groups)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        model, ids, u, part = _gpt2()
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root owns the embeddings, tied with lm_head
        params = dict(model.named_parameters())
        u = {k: distribute_tensor(u[k], mesh, p.placements) for k, p in params.items()}
        mine = ids[rank::world]
        loss = hos.model_loss(model, _next_token, {"input_ids": mine}, mine, output="logits")
        res = {}
        with layer_gathers() as made:
            res["summarize"] = hos.summarize(loss, params, u, part)  # checked against the model
        res["gathers"] = sum(g.gathers for g in made)
        grad = hos.gradient_direction(loss, params)
        res["gradient"] = {k: g.full_tensor() for k, g in grad.items()}
        # fine-tuning with the (tied) embeddings frozen: FSDP frees its copy after the forward
        model, ids, u, part = _gpt2(frozen_embeddings=True)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        u = {k: distribute_tensor(u[k], mesh, params[k].placements) for k in params}
        mine = ids[rank::world]
        loss = hos.model_loss(model, _next_token, {"input_ids": mine}, mine, output="logits")
        res["frozen"] = hos.summarize(loss, params, u, part)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2")
    return spawned(_worker, (WORLD, _free_port(), str(out)), WORLD, out)


def test_gpt2_sharded_per_block_equals_the_unsharded_model(ranks):
    """Per block FSDP2 with the tied embedding: its output projection (`lm_head.weight`, the
    same parameter as `transformer.wte.weight`) moves with η too (it used to run on FSDP's own
    freed weight and raise)."""
    model, ids, u, part = _gpt2()
    loss = hos.model_loss(model, _next_token, {"input_ids": ids}, ids, output="logits")
    params = {k: p.detach() for k, p in model.named_parameters()}
    want = hos.summarize(loss, params, u, part, backend="reverse")
    gradient = hos.gradient_direction(loss, params)
    for res in ranks:
        for name in ("g", "H", "d3", "loss"):
            assert_close(getattr(res["summarize"], name), getattr(want, name), name, **RANKS)
        for k, g in gradient.items():
            assert_close(res["gradient"][k], g, f"gradient {k}", **RANKS_GRADIENT)
        assert res["gathers"] > 0  # the layer-at-a-time path ran


def test_gpt2_with_frozen_embeddings_equals_the_unsharded_model(ranks):
    """Fine-tuning with the tied embeddings frozen (left out of θ): FSDP frees its gathered copy
    after the root's forward, and the output projection reads it again at the end of the model —
    hos gathers it itself, a layer at a time."""
    model, ids, u, part = _gpt2(frozen_embeddings=True)
    loss = hos.model_loss(model, _next_token, {"input_ids": ids}, ids, output="logits")
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    assert "transformer.wte.weight" not in params
    want = hos.summarize(loss, params, u, part, backend="reverse")
    for res in ranks:
        for name in ("g", "H", "d3", "loss"):
            assert_close(getattr(res["frozen"], name), getattr(want, name), name, **RANKS)

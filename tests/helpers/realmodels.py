"""Model code hos did not write, built from configs with random weights (nothing downloaded).

Each entry builds, in float64, a model of torchvision, timm, Hugging Face transformers or
torch.nn, a batch, its loss (`hos.model_loss`, with an output adapter where the model returns
a dict-like output), a direction and a *coarse* partition (a few groups, so that the
finite-difference oracle stays cheap). Where a model has ReLU or max pooling, `smooth` swaps
them for SiLU (same `inplace` flag) and average pooling (same geometry): the same code paths
run, and differences of order >= 2 mean something. Piecewise activations that stay
(Hardswish, Hardsigmoid) are trusted only where two step sizes agree (tests/helpers/fd.py).

Used by tests/test_real_models.py and analysis/model_matrix.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import hos
from tests.helpers.thirdparty import missing, torchvision_models

DT = torch.float64


@dataclass
class Built:
    """One model with everything a summary needs."""

    name: str
    model: nn.Module
    loss: hos.ModelLoss
    params: dict[str, torch.Tensor]
    direction: dict[str, torch.Tensor]
    partition: hos.Partition
    #: how far the finite-difference oracle can be trusted here, per quantity
    fd_keys: tuple[str, ...] = ("g", "H", "d3")
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: the precision the model computes in (float32 islands of a float64 model: Hugging Face's
    #: RMSNorm); the tolerances of the oracle and of the backends' agreement follow it
    precision: torch.dtype = torch.float64


@dataclass(frozen=True)
class Entry:
    name: str
    family: str  # "torchvision", "timm", "transformers" or "torch.nn"
    build: Callable[[], Built]
    requires: str | None = None  # the package it needs


def unavailable(package: str | None) -> str | None:
    """Why the entries needing `package` cannot run here (see tests/helpers/thirdparty.py), or None."""
    return None if package is None else missing(package)


def available(package: str | None) -> bool:
    return unavailable(package) is None


def smooth(model: nn.Module) -> nn.Module:
    """ReLU → SiLU (same `inplace` flag) and max → average pooling (same geometry)."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, nn.SiLU(inplace=child.inplace))
        elif isinstance(child, nn.MaxPool2d):
            setattr(
                model,
                name,
                nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode),
            )
        else:
            smooth(child)
    return model


def _direction(params, gen, scale=0.05):
    return {k: scale * torch.randn(p.shape, generator=gen, dtype=DT) for k, p in params.items()}


def _finish(name, model, criterion, inputs, targets, groups, gen, output=None, **kw) -> Built:
    model = model.to(DT)
    loss = hos.model_loss(model, criterion, inputs, targets, output=output)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    part = hos.Partition.from_groups(model, groups, rest="rest")
    return Built(name, model, loss, params, _direction(params, gen), part, **kw)


def _image_batch(gen, n=4, size=32, classes=5):
    x = torch.randn(n, 3, size, size, generator=gen, dtype=DT)
    return x, torch.randint(0, classes, (n,), generator=gen)


# --------------------------------------------------------------------------- torchvision
def _tv(name, train, groups, size=32, fd_keys=("g", "H", "d3"), notes="", **kwargs):
    def build() -> Built:
        models = torchvision_models()
        torch.manual_seed(0)
        model = smooth(getattr(models, name)(num_classes=5, **kwargs)).train(train)
        gen = torch.Generator().manual_seed(1)
        x, y = _image_batch(gen, size=size)
        label = f"torchvision {name} ({'train' if train else 'eval'})"
        return _finish(label, model, nn.CrossEntropyLoss(), x, y, groups, gen, fd_keys=fd_keys,
                       notes=notes)  # fmt: skip

    return build


def _tv_vit() -> Built:
    from torchvision.models import VisionTransformer  # noqa: F401 - import check

    models = torchvision_models()
    torch.manual_seed(0)
    model = models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5, dropout=0.1, attention_dropout=0.1,
    ).train()  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x, y = _image_batch(gen)
    groups = {"embed": ["conv_proj.*", "class_token", "encoder.pos_embedding"],
              "block0": ["encoder.layers.encoder_layer_0.*"],
              "block1": ["encoder.layers.encoder_layer_1.*"], "head": ["encoder.ln.*", "heads.*"]}  # fmt: skip
    return _finish("torchvision VisionTransformer (train)", model, nn.CrossEntropyLoss(), x, y,
                   groups, gen)  # fmt: skip


# --------------------------------------------------------------------------- timm
def _timm(arch, groups, label, **kwargs):
    def build() -> Built:
        import timm

        torch.manual_seed(0)
        model = smooth(timm.create_model(arch, pretrained=False, num_classes=5, **kwargs)).train()
        gen = torch.Generator().manual_seed(1)
        x, y = _image_batch(gen)
        return _finish(label, model, nn.CrossEntropyLoss(), x, y, groups, gen)

    return build


_VIT_GROUPS = {"embed": ["patch_embed.*", "cls_token", "pos_embed"], "block0": ["blocks.0.*"],
               "block1": ["blocks.1.*"], "head": ["norm.*", "head.*"]}  # fmt: skip


# --------------------------------------------------------------------------- transformers
def _lm_cross_entropy(logits, labels):
    """Next-token cross-entropy (the causal LM loss)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _mlm_cross_entropy(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _gpt2(attn: str):
    def build() -> Built:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0, attn_implementation=attn)  # fmt: skip
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).train()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 40, (2, 8), generator=gen)
        groups = {"embed": ["transformer.wte.*", "transformer.wpe.*"],
                  "block0": ["transformer.h.0.*"], "block1": ["transformer.h.1.*"],
                  "final": ["transformer.ln_f.*"]}  # fmt: skip
        return _finish(f"transformers GPT-2 ({attn})", model, _lm_cross_entropy,
                       {"input_ids": ids}, ids, groups, gen, output="logits")  # fmt: skip

    return build


def _padded(gen, pad: str, vocab: int = 40, n: int = 3, length: int = 7):
    """Token ids with padding on the `pad` side ("left": decoders' generation batches; a row
    with one real token makes fully masked query rows), the mask, next-token labels."""
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.long)
    if pad == "left":
        mask[1, :3] = 0
        mask[2, :6] = 0
    else:
        mask[1, 4:] = 0
        mask[2, 1:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _lm_padded_cross_entropy(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)  # fmt: skip


def _gpt2_padded(pad: str):
    def build() -> Built:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0,
                            attn_implementation="sdpa")  # fmt: skip
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).train()
        gen = torch.Generator().manual_seed(1)
        ids, mask, labels = _padded(gen, pad)
        groups = {"embed": ["transformer.wte.*", "transformer.wpe.*"],
                  "block0": ["transformer.h.0.*"], "block1": ["transformer.h.1.*"],
                  "final": ["transformer.ln_f.*"]}  # fmt: skip
        return _finish(f"transformers GPT-2 (sdpa, {pad}-padded)", model,
                       _lm_padded_cross_entropy, {"input_ids": ids, "attention_mask": mask},
                       labels, groups, gen, output="logits")  # fmt: skip

    return build


def _decoder(kind: str, pad: str):
    """Llama / Qwen2 / Mistral, SDPA attention (their default), grouped-query heads, a padded
    batch. Their RMSNorm computes in float32 inside a float64 model: float32 precision."""

    def build() -> Built:
        import transformers

        config = getattr(transformers, f"{kind}Config")(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            attn_implementation="sdpa", pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(0)
        model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
        gen = torch.Generator().manual_seed(1)
        ids, mask, labels = _padded(gen, pad)
        groups = {"embed": ["model.embed_tokens.*"], "layer0": ["model.layers.0.*"],
                  "layer1": ["model.layers.1.*"], "head": ["model.norm.*", "lm_head.*"]}  # fmt: skip
        return _finish(f"transformers {kind} (sdpa, {pad}-padded)", model,
                       _lm_padded_cross_entropy, {"input_ids": ids, "attention_mask": mask},
                       labels, groups, gen, output="logits", fd_keys=("g",),
                       precision=torch.float32,
                       notes="RMSNorm in float32: second and third differences of the float64 "
                       "loss drown in float32 rounding; H̄ and d3 are checked across backends "
                       "and by hos's own check against the model's gradients")  # fmt: skip

    return build


def _mixtral() -> Built:
    """A mixture of experts: the router's top-k (torch.return_types) picks two experts per
    token (experts_implementation="eager": the grouped matmul kernel has no float64)."""
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=32, attn_implementation="sdpa", experts_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (2, 6), generator=gen)
    groups = {"embed": ["model.embed_tokens.*"], "attention": ["model.layers.0.self_attn.*"],
              "router": ["model.layers.0.mlp.gate.*"], "experts": ["model.layers.0.mlp.experts.*"],
              "norms+head": ["*norm*", "lm_head.*"]}  # fmt: skip
    return _finish("transformers Mixtral (top-2 router)", model, _lm_cross_entropy,
                   {"input_ids": ids}, ids, groups, gen, output="logits", fd_keys=("g",),
                   precision=torch.float32,
                   notes="RMSNorm in float32 (see the decoders)")  # fmt: skip


def _levit_hf() -> Built:
    """Hugging Face LeViT in eval mode, run once before (anyone evaluates first): its attention
    layers cache `attention_biases[:, idxs]` on the first eval call."""
    from transformers import LevitConfig, LevitForImageClassification

    config = LevitConfig(image_size=64, patch_size=16, hidden_sizes=[16, 24, 32],
                         num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
                         mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], num_labels=5)  # fmt: skip
    torch.manual_seed(0)
    model = LevitForImageClassification(config).to(DT).eval()
    for name, p in model.named_parameters():  # random biases, so that they matter
        if name.endswith("attention_biases"):
            torch.nn.init.normal_(p, std=0.5)
    gen = torch.Generator().manual_seed(1)
    x, y = _image_batch(gen, size=64)
    with torch.no_grad():
        model(x)  # fills the caches
    groups = {"attention biases": ["*attention_biases"], "stem": ["levit.patch_embeddings.*"]}
    built = _finish("transformers LeViT (eval, cached attention biases)", model,
                    nn.CrossEntropyLoss(), x, y, groups, gen, output="logits", fd_keys=("g", "H"),
                    notes="Hardswish kinks: entries trusted where two step sizes agree")  # fmt: skip
    return built


def _timm_cached(arch: str, label: str, size: int = 64, **kwargs):
    """A timm model whose attention caches its biases in eval mode, run once before. `arch` is
    a registered name, or "module:Class" for a small instance of a model class."""

    def build() -> Built:
        import importlib

        import timm

        torch.manual_seed(0)
        if ":" in arch:
            where, name = arch.split(":")
            model = getattr(importlib.import_module(where), name)(num_classes=5, **kwargs)
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs)
        model = model.to(DT).eval()
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                torch.nn.init.normal_(p, std=0.5)
        gen = torch.Generator().manual_seed(1)
        x, y = _image_batch(gen, n=2, size=size)
        with torch.no_grad():
            model(x)  # fills the caches
        groups = {"attention biases": ["*attention_biases"]}
        return _finish(label, model, nn.CrossEntropyLoss(), x, y, groups, gen,
                       fd_keys=("g", "H"), notes="entries trusted where two step sizes agree")  # fmt: skip

    return build


def _bert(attn: str):
    def build() -> Built:
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=16, attn_implementation=attn)  # fmt: skip
        torch.manual_seed(0)
        model = BertForMaskedLM(config).train()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 40, (2, 8), generator=gen)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 6:] = 0  # padding in the second sequence
        groups = {"embed": ["bert.embeddings.*"], "layer0": ["bert.encoder.layer.0.*"],
                  "layer1": ["bert.encoder.layer.1.*"], "head": ["cls.*"]}  # fmt: skip
        return _finish(f"transformers BERT ({attn})", model, _mlm_cross_entropy,
                       {"input_ids": ids, "attention_mask": mask}, ids, groups, gen,
                       output="logits")  # fmt: skip

    return build


# --------------------------------------------------------------------------- torch.nn
class _EncoderClassifier(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1,
                                           activation="gelu", batch_first=True,
                                           norm_first=norm_first)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


def _encoder(norm_first: bool, train: bool):
    def build() -> Built:
        torch.manual_seed(0)
        model = _EncoderClassifier(norm_first).train(train)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 5, 8, generator=gen, dtype=DT)
        y = torch.randint(0, 3, (2,), generator=gen)
        groups = {"layer0": ["encoder.layers.0.*"], "layer1": ["encoder.layers.1.*"],
                  "head": ["head.*"]}  # fmt: skip
        mode = "train" if train else "eval"
        return _finish(f"nn.TransformerEncoder (norm_first={norm_first}, {mode})", model,
                       nn.CrossEntropyLoss(), x, y, groups, gen)  # fmt: skip

    return build


class _TiedLSTM(nn.Module):
    """An LSTM language model whose decoder shares the embedding matrix."""

    def __init__(self, vocab=20, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=2, dropout=0.2, batch_first=True)
        self.decoder = nn.Linear(width, vocab)
        self.decoder.weight = self.embed.weight  # tied

    def forward(self, ids):
        h, _ = self.lstm(self.embed(ids))
        return self.decoder(h)


def _tied_lstm() -> Built:
    torch.manual_seed(0)
    model = _TiedLSTM().train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (2, 6), generator=gen)
    groups = {"embedding (tied)": ["embed.weight"], "lstm.l0": ["lstm.*_l0"],
              "lstm.l1": ["lstm.*_l1"], "decoder bias": ["decoder.bias"]}  # fmt: skip
    return _finish("nn.LSTM language model (tied weights)", model, _lm_cross_entropy, ids, ids,
                   groups, gen)  # fmt: skip


# --------------------------------------------------------------------------- the matrix
_RESNET = {"stem": ["conv1.*", "bn1.*"], "layer1": ["layer1.*"],
           "layer2-3": ["layer2.*", "layer3.*"], "head": ["layer4.*", "fc.*"]}  # fmt: skip
_MOBILENET = {"stem": ["features.0.*"], "early": ["features.1.*", "features.2.*"],
              "late": ["features.[3-9].*", "features.1[0-9].*"], "head": ["classifier.*"]}  # fmt: skip
_SQUEEZE = {"stem": ["features.0.*"], "fire-early": ["features.[3-5].*"],
            "fire-late": ["features.[6-9].*", "features.1[0-2].*"], "head": ["classifier.*"]}  # fmt: skip
_EFFNET = {"stem": ["features.0.*"], "early": ["features.[1-3].*"],
           "late": ["features.[4-8].*"], "head": ["classifier.*"]}  # fmt: skip

ENTRIES: tuple[Entry, ...] = (
    Entry("resnet18-train", "torchvision", _tv("resnet18", True, _RESNET), "torchvision"),
    Entry(
        "resnet18-eval",
        "torchvision",
        _tv(
            "resnet18",
            False,
            _RESNET,
            fd_keys=("g", "H"),
            notes="eval-mode BN with initial running statistics: third differences of this "
            "deep float64 loss are too noisy to trust (the backends agree)",
        ),
        "torchvision",
    ),  # fmt: skip
    Entry(
        "mobilenet_v3_small",
        "torchvision",
        _tv("mobilenet_v3_small", True, _MOBILENET),
        "torchvision",
    ),  # fmt: skip
    Entry(
        "squeezenet1_1", "torchvision", _tv("squeezenet1_1", True, _SQUEEZE, size=48), "torchvision"
    ),  # fmt: skip
    Entry(
        "efficientnet_b0",
        "torchvision",
        _tv("efficientnet_b0", True, _EFFNET, size=64, stochastic_depth_prob=0.2),
        "torchvision",
    ),  # fmt: skip
    Entry("vit-torchvision", "torchvision", _tv_vit, "torchvision"),
    Entry(
        "vit-timm",
        "timm",
        _timm(
            "vit_tiny_patch16_224",
            _VIT_GROUPS,
            "timm ViT-tiny (train)",
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=16,
            num_heads=2,
            drop_path_rate=0.1,
        ),
        "timm",
    ),  # fmt: skip
    Entry(
        "deit-timm",
        "timm",
        _timm(
            "deit_tiny_patch16_224",
            _VIT_GROUPS,
            "timm DeiT-tiny (train)",
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=16,
            num_heads=2,
        ),
        "timm",
    ),  # fmt: skip
    Entry(
        "convnext-timm",
        "timm",
        _timm(
            "convnext_atto",
            {
                "stem": ["stem.*"],
                "stage0-1": ["stages.0.*", "stages.1.*"],
                "stage2-3": ["stages.2.*", "stages.3.*"],
                "head": ["head.*"],
            },
            "timm ConvNeXt-atto (LayerNorm2d, depthwise conv, train)",
            depths=(1, 1, 1, 1),
            dims=(8, 16, 24, 32),
            drop_path_rate=0.1,
        ),
        "timm",
    ),  # fmt: skip
    Entry("gpt2-eager", "transformers", _gpt2("eager"), "transformers"),
    Entry("gpt2-sdpa-leftpad", "transformers", _gpt2_padded("left"), "transformers"),
    Entry("gpt2-sdpa-rightpad", "transformers", _gpt2_padded("right"), "transformers"),
    Entry("llama-sdpa-leftpad", "transformers", _decoder("Llama", "left"), "transformers"),
    Entry("qwen2-sdpa-rightpad", "transformers", _decoder("Qwen2", "right"), "transformers"),
    Entry("mistral-sdpa-leftpad", "transformers", _decoder("Mistral", "left"), "transformers"),
    Entry("mixtral-router", "transformers", _mixtral, "transformers"),
    Entry("levit-hf-eval", "transformers", _levit_hf, "transformers"),
    Entry(
        "levit-timm-eval",
        "timm",
        _timm_cached("levit_128s", "timm LeViT-128S (eval, cached attention biases)", img_size=64),
        "timm",
    ),  # fmt: skip
    Entry(
        "efficientformer-timm-eval",
        "timm",
        _timm_cached(
            "timm.models.efficientformer:EfficientFormer",
            "timm EfficientFormer (eval, cached "
            "attention biases; small widths, its fixed 224-pixel input)",
            size=224,
            depths=(1, 1, 1, 2),
            embed_dims=(8, 16, 24, 32),
            num_vit=1,
        ),
        "timm",
    ),  # fmt: skip
    Entry("gpt2-sdpa", "transformers", _gpt2("sdpa"), "transformers"),
    Entry("bert-eager", "transformers", _bert("eager"), "transformers"),
    Entry("bert-sdpa", "transformers", _bert("sdpa"), "transformers"),
    Entry("encoder-post-train", "torch.nn", _encoder(False, True)),
    Entry("encoder-pre-train", "torch.nn", _encoder(True, True)),
    Entry("encoder-post-eval", "torch.nn", _encoder(False, False)),
    Entry("encoder-pre-eval", "torch.nn", _encoder(True, False)),
    Entry("lstm-tied", "torch.nn", _tied_lstm),
)

BY_NAME = {e.name: e for e in ENTRIES}

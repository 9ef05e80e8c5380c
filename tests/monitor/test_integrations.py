"""hos.integrations: TensorBoard and W&B sinks read back through their own readers, and the
Lightning / Hugging Face callbacks in real (tiny, CPU, offline) training runs."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hos
from hos import reference
from hos.integrations import TensorBoardSink, WandbSink, scalars
from tests.helpers.thirdparty import needs
from tests.helpers.tolerances import FLOAT32, FLOAT32_LOSS, FLOAT32_STORED, assert_close

pytestmark = pytest.mark.thirdparty

DT = torch.float64


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def data(n=16):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def exact_H(net, x, y):
    loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    p = {k: v.clone().requires_grad_() for k, v in theta.items()}
    u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
    return reference.summary_tensor(loss, theta, u, hos.Partition.per_layer(net), order=2)


@needs("tensorboard")
def test_tensorboard_sink_writes_scalars_and_the_heatmap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    net = tiny()
    x, y = data()
    sink = TensorBoardSink(tmp_path / "tb", heatmap_every=2)
    mon = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, sinks=[sink])
    snaps = [mon.record(step, x, y) for step in (0, 10, 20)]
    mon.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert set(scalars(snaps[0])) <= set(tags["scalars"])
    # the groups' labels, as everywhere (layers 0 and 2 of the Sequential are fc1 and fc2)
    assert "hos/g/fc1" in tags["scalars"] and "hos/d3/fc2" in tags["scalars"]
    loss = events.Scalars("hos/loss")
    assert [e.step for e in loss] == [0, 10, 20]
    np.testing.assert_allclose(
        [e.value for e in loss], [s.loss for s in snaps], rtol=FLOAT32_STORED
    )
    g0 = events.Scalars("hos/g/fc1")
    np.testing.assert_allclose([e.value for e in g0], [s.g[0] for s in snaps], rtol=FLOAT32_STORED)
    images = events.Images("hos/interactions")
    assert [e.step for e in images] == [0, 20]  # heatmap_every=2
    assert images[0].encoded_image_string[:4] == b"\x89PNG"


def test_wandb_sink_logs_through_the_wandb_client_offline(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    net = tiny()
    x, y = data()
    run = wandb.init(project="hos-test", dir=str(tmp_path), mode="offline")
    # the offline run file is W&B's own binary format (its reader is not public): watch what
    # reaches the client, and let the client write it
    calls = []
    real_log = run.log
    monkeypatch.setattr(
        run, "log", lambda data, **kw: (calls.append((data, kw)), real_log(data, **kw))
    )
    try:
        mon = hos.SummaryMonitor(net, nn.CrossEntropyLoss(), every=1, sinks=[WandbSink(run)])
        snaps = [mon.record(step, x, y) for step in (3, 7)]
    finally:
        run.finish()
    assert [kw for _, kw in calls] == [{"step": 3}, {"step": 7}]
    for (payload, _), snap in zip(calls, snaps):
        assert payload["hos/loss"] == snap.loss
        assert payload["hos/g/fc2"] == float(snap.g[1])
        assert isinstance(payload["hos/interactions"], wandb.Image)
    assert list(tmp_path.rglob("*.wandb")), "no offline run file written"


def test_wandb_sink_without_a_run_is_a_clear_error(monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(RuntimeError, match="no active wandb run; call wandb.init"):
        WandbSink()


@needs("lightning")
def test_lightning_callback_in_a_real_trainer(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from hos.integrations.lightning import SummaryCallback

    x, y = data(32)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny()

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    module = Module()
    initial = {k: v.detach().clone() for k, v in module.named_parameters()}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = SummaryCallback(
        nn.CrossEntropyLoss(), every=2, batch=(x, y), log_dir=tmp_path / "hos"
    )
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[callback], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, loader)
    run = hos.load_log(tmp_path / "hos")
    assert run.steps.tolist() == [0, 2, 4]
    assert run.names == ("net.0", "net.2")
    # the first snapshot is the summary at the initial parameters
    start = tiny()
    start.load_state_dict({k.removeprefix("net."): v for k, v in initial.items()})
    assert_close(torch.from_numpy(run.H[0]), exact_H(start, x, y), "oracle")
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "hos/offdiagonal_share" in metrics.splitlines()[0]


def test_huggingface_callback_in_a_real_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hos.integrations.huggingface import SummaryCallback

    config = transformers.GPT2Config(
        vocab_size=37, n_positions=16, n_embd=8, n_layer=1, n_head=2,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 37, (8, 6), generator=g)
    rows = [{"input_ids": r, "labels": r} for r in ids]
    probe = {"input_ids": ids[:2], "labels": ids[:2]}
    partition = hos.Partition.from_groups(
        model,
        {
            "embeddings": ["transformer.wte.weight", "transformer.wpe.weight"],
            "block": [k for k, _ in model.named_parameters() if k.startswith("transformer.h.")],
            "final norm": ["transformer.ln_f.weight", "transformer.ln_f.bias"],
        },
    )
    callback = SummaryCallback(probe, every=2, partition=partition, log_dir=tmp_path / "hos")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    run = hos.load_log(tmp_path / "hos")
    assert run.steps.tolist() == [0, 2]
    assert run.names == ("embeddings", "block", "final norm")
    # step 0: the model's own loss at the initial parameters, against the oracle
    fresh = transformers.GPT2LMHeadModel(config)
    fresh.load_state_dict(initial, strict=False)
    fresh.train()
    loss = hos.model_loss(fresh, lambda out, _: out, probe, None, output="loss")
    theta = {k: v.detach() for k, v in fresh.named_parameters()}
    p = {k: v.clone().requires_grad_() for k, v in theta.items()}
    u = dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))
    part = hos.Partition.from_groups(fresh, dict(partition))
    exact = reference.summary_tensor(loss, theta, u, part, order=2)
    assert_close(torch.from_numpy(run.H[0]), exact.double(), "oracle", **FLOAT32)
    assert run.loss[0] == pytest.approx(float(loss(theta)), rel=FLOAT32_LOSS)

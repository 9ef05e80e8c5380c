"""A PyTorch Lightning run with the summary callback

`hos.integrations.lightning.SummaryCallback` runs a [`hos.SummaryMonitor`][hos.SummaryMonitor]
inside a Lightning `Trainer`: every `every` optimizer steps, before the update, on a fixed
batch. Its scalars also go to the trainer's own loggers (here a `CSVLogger`; TensorBoard or
W&B loggers work the same), and the log folder is read back with [`hos.load_log`][hos.load_log].
"""

import csv
import logging
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import hos
from hos import plotting
from hos.datasets import load_dataset
from hos.integrations.lightning import SummaryCallback

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
data = load_dataset("digits")
x, y = data.train.tensors


class DigitsMLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
            nn.Linear(32, 10),
        )  # fmt: skip

    def forward(self, inputs):
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


# %%
# The callback takes the criterion, the period and a fixed batch; the rest goes to the
# monitor (here: the momentum buffer of the trainer's optimizer as the direction).
folder = Path(tempfile.mkdtemp())
callback = SummaryCallback(
    nn.CrossEntropyLoss(), every=10, batch=(x[:128], y[:128]), direction="momentum",
    log_dir=folder / "hos",
)  # fmt: skip
trainer = pl.Trainer(
    max_steps=60, accelerator="cpu", logger=CSVLogger(folder), callbacks=[callback],
    enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    log_every_n_steps=10,
)  # fmt: skip
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
trainer.fit(DigitsMLP(), loader)

# %%
# Step 0 has no momentum yet (the monitor warns and skips it); the rest are in the log and
# in Lightning's metrics file.
run = hos.load_log(folder / "hos")
print("steps:", run.steps.tolist(), "direction:", run.settings["direction"])
assert run.steps.tolist() == [10, 20, 30, 40, 50]
with open(folder / "lightning_logs" / "version_0" / "metrics.csv") as f:
    rows = [r for r in csv.DictReader(f) if r.get("hos/loss")]
print("hos/loss in Lightning's CSV:", [round(float(r["hos/loss"]), 4) for r in rows])
assert len(rows) == 5

plotting.log_series(run, "d3")
plotting.log_offdiagonal_share(run)
plt.show()

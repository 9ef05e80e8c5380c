"""Watch a training run: summaries over time, logged and plotted

A small CNN with BatchNorm trains on scikit-learn's 8×8 digits (real handwriting) with SGD and
momentum. Every 10 steps [`hos.SummaryMonitor`][hos.SummaryMonitor] records ḡ, H̄ and diag D³
per layer along the batch gradient, writes them to an append-only log and to TensorBoard,
and does nothing else: the run ends with the same parameters, bit for bit, as a run without
it. [`hos.load_log`][hos.load_log] reads the log back as series over steps.
"""

import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

import hos
from hos import plotting
from hos.datasets import load_dataset
from hos.integrations import TensorBoardSink

data = load_dataset("digits")
x_all, y_all = data.train.tensors
probe = (x_all[:128], y_all[:128])  # a fixed batch: numbers comparable over time


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, 10),
    )  # fmt: skip


def train(net, steps, monitor=None):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        idx = order[(step * 32) % len(x_all) :][:32]
        if monitor is not None:
            monitor.step(step, *probe)  # before the update: the summary at θ_step
        opt.zero_grad()
        nn.functional.cross_entropy(net(x_all[idx]), y_all[idx]).backward()
        opt.step()
    return net


# %%
# The monitor: the model, its criterion, the period, where to log. The direction is the
# gradient on the probe batch (also: "momentum" with optimizer=..., "random", a callable).
log_dir = Path(tempfile.mkdtemp()) / "run"
net = make_net()
monitor = hos.SummaryMonitor(
    net, nn.CrossEntropyLoss(), every=10, log_dir=log_dir,
    sinks=[TensorBoardSink(log_dir.parent / "tensorboard", heatmap_every=3)],
)  # fmt: skip
print(monitor)
with monitor:
    train(net, 80, monitor)

# %%
# No effect on training: the same run without the monitor ends at the same parameters.
plain = train(make_net(), 80)
same = all(
    torch.equal(a, b) for a, b in zip(net.state_dict().values(), plain.state_dict().values())
)
print("bit-for-bit the same final parameters and buffers:", same)
assert same

# %%
# The log, read back. Along the gradient, ḡ_s = ‖∇_s L‖² (a closed form to check against).
run = hos.load_log(log_dir)
print("steps:", run.steps.tolist(), " groups:", run.names)
print("seconds per snapshot:", run.seconds.round(3).tolist())
assert run.steps.tolist() == list(range(0, 80, 10))
last = make_net()
last.load_state_dict(net.state_dict())
loss = hos.model_loss(last, nn.CrossEntropyLoss(), *probe)
theta = {k: v.detach().clone().requires_grad_() for k, v in last.named_parameters()}
grads = dict(zip(theta, torch.autograd.grad(loss(theta), list(theta.values()))))
# the final parameters are one step past the last snapshot: recompute that snapshot instead
check = hos.SummaryMonitor(last, nn.CrossEntropyLoss(), every=1).record(80, *probe)
norms = [sum(float((grads[p] ** 2).sum()) for p in group) for _, group in run.groups.items()]
print("g (monitor)       :", check.g.round(6).tolist())
print("‖∇_s L‖² (autograd):", [round(v, 6) for v in norms])
assert torch.allclose(torch.tensor(check.g), torch.tensor(norms, dtype=torch.float64), rtol=1e-4)

# %%
# Figures from the log (the same as `hos plot LOG --out DIR`, which also writes an HTML
# page with a step slider): the interaction heatmaps over training, ḡ per layer, and the
# share of H̄ off its diagonal (how much the layers interact) with the loss.
plotting.log_heatmaps(run, panels=4)
plotting.log_series(run, "g")
plotting.log_offdiagonal_share(run)
plt.show()

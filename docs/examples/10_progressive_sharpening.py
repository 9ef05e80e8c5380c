"""Sharpness and where it lives: progressive sharpening at two learning rates

Full-batch gradient descent on 512 of scikit-learn's 8×8 digits (real handwriting), a tanh
network of three hidden layers with a mean-squared-error loss — the setting in which Cohen et al. (2021) saw the top
eigenvalue of the Hessian, the *sharpness* $\\lambda_{\\max}$, rise during training until it
reaches the stability threshold $2/\\eta$ of gradient descent and then hover there (the edge of
stability). [`hos.SummaryMonitor`][hos.SummaryMonitor] with `sharpness=True` records
$\\lambda_{\\max}$ (Lanczos on hos's exact Hessian-vector products), its split into pairs of
layers and the layers' Hessian traces every few steps; `hos plot` draws the same figure from the
log. At the end, [`hos.sharpness`][hos.sharpness] says which layers carry the sharpness and
[`hos.sharpness_gradient`][hos.sharpness_gradient] gives $\\nabla\\lambda_{\\max} = D^3L[v, v,
\\cdot]$, checked here against a finite difference of $\\lambda_{\\max}$ itself.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import hos
from hos import plotting
from hos.datasets import load_dataset

data = load_dataset("digits")
x, labels = data.train.tensors
x, labels = x[:512].flatten(1).double(), labels[:512]
y = nn.functional.one_hot(labels, 10).double()  # MSE on one-hot targets, as in Cohen et al.


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
        nn.Linear(64, 10),
    ).double()  # fmt: skip


def train(lr, steps=600, every=50):
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=lr)  # full batch: gradient descent
    monitor = hos.SummaryMonitor(net, nn.MSELoss(), every=every, optimizer=opt, sharpness=True,
                                 trace_budget=15)  # fmt: skip
    for step in range(steps + 1):
        monitor.step(step, x, y)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return net, monitor.snapshots


# %%
# Two learning rates. At η = 0.2 the threshold 2/η = 10 is far: the sharpness keeps climbing
# (progressive sharpening). At η = 1 it climbs to 2/η = 2 within 100 steps and then stays there
# while the loss keeps decreasing, non-monotonically (the edge of stability).
runs = {lr: train(lr) for lr in (0.2, 1.0)}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
for ax, (lr, (_, snaps)) in zip(axes, runs.items()):
    steps = [s.step for s in snaps]
    plotting.sharpness_curve(steps, [s.sharpness for s in snaps], lr=lr,
                             title=f"gradient descent, η = {lr}", ax=ax)  # fmt: skip
for lr, (_, snaps) in runs.items():
    values = ", ".join(f"{s.sharpness:.2f}" for s in snaps)
    print(f"η = {lr} (2/η = {2 / lr:g}): λ_max every 50 steps: {values}")
slow, fast = runs[0.2][1], runs[1.0][1]
assert slow[-1].sharpness > 1.5 * slow[0].sharpness  # progressive sharpening
assert slow[-1].sharpness < 0.5 * 2 / 0.2  # ... far below its threshold
edge = [s.sharpness for s in fast if s.step >= 200]
assert all(abs(value - 2 / 1.0) < 0.25 * 2 / 1.0 for value in edge)  # held at 2/η

# %%
# Where the sharpness lives at the end of the η = 0.2 run: λ_max split into pairs of layers
# (v_sᵀ H_st v_t, summing to λ_max), and the gradient of the sharpness.
net = runs[0.2][0]
loss = hos.model_loss(net, nn.MSELoss(), x, y)
params = {k: p.detach() for k, p in net.named_parameters()}
sharp = hos.sharpness(loss, params, partition=hos.Partition.per_layer(net), gradient=True)
print(f"λ_max = {sharp.value:.4f}, gap to the next eigenvalue {sharp.gap:.3g}, "
      f"D³L[v, v, v] = {sharp.cubic:.3g}")  # fmt: skip
plotting.sharpness_split(sharp, title="the MLP after 600 steps at η = 0.2")

# A check that shares nothing with the computation: λ_max a small step along the sharpness
# gradient, by Lanczos again, against the first-order prediction.
norm = torch.sqrt(sum((g**2).sum() for g in sharp.gradient.values()))
h = 1e-4
moved = {k: p + h * sharp.gradient[k] / norm for k, p in params.items()}
predicted = sharp.value + h * float(norm)
actual = float(hos.hessian_eigenpairs(loss, moved, 1).values[0])
print(f"λ_max after a step of {h:g} along ∇λ_max: {actual:.8f}, predicted {predicted:.8f}")
assert abs(actual - predicted) < 1e-3 * h * float(norm) + 1e-9

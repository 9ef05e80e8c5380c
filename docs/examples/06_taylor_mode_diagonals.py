"""High-order diagonals by Taylor mode, through BatchNorm

The diagonal entries D^(k)_{s…s} are the derivatives of one-variable functions,
t ↦ L(θ + t u_s). The default backend (``"taylor"``) gets all of them, for every group and
every order up to d, from one forward pass that carries the Taylor coefficients of each
activation along each group's line — no backward pass at all. Here, on a small conv net
with BatchNorm in training mode (normalised by the batch statistics, which hos routes
through an exact decomposition), we take the diagonals of orders 1 to 6, check them against
`hos.reference` (nested ``jacfwd``), and draw what they are: the Taylor polynomials of the
loss along one group's direction. They close in on the loss as the order grows near t = 0 and
peel away from it past |t| ≈ 0.05 — the radius within which a local model of this loss along
u_s can be trusted at all (compare the Taylor-validity results on the Results page).
"""

import math

import matplotlib.pyplot as plt
import torch
from torch import nn

import hos
from hos import reference

torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv2d(1, 4, 3),
    nn.BatchNorm2d(4),
    nn.Tanh(),
    nn.Flatten(),
    nn.Linear(4 * 6 * 6, 3),
).double()
x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
y = torch.randint(0, 3, (16,))
loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
params = {k: p.detach() for k, p in net.named_parameters()}
u = {k: torch.randn_like(p) for k, p in params.items()}
part = hos.Partition.per_layer(net)  # conv, BatchNorm (γ, β), linear: S = 3

# %%
# All orders 1..6 by Taylor mode, and the oracle for each; they agree to round-off.
orders = range(1, 7)
taylor = torch.stack([hos.summary_diagonal(loss, params, u, part, d) for d in orders])
oracle = torch.stack([reference.summary_diagonal(loss, params, u, part, d) for d in orders])
error = ((taylor - oracle).abs() / oracle.abs().clamp_min(1e-300)).max(dim=1).values
print("order   " + "  ".join(f"{n:>12s}" for n in part.names) + "   max rel. error")
for d, row, e in zip(orders, taylor, error):
    print(f"{d:5d}   " + "  ".join(f"{v:12.4e}" for v in row.tolist()) + f"   {e:.1e}")
assert float(error.max()) < 1e-9, error

# %%
# What the numbers are: along the convolution group's direction, the loss and its Taylor
# polynomials Σ_k D^(k) t^k / k! of orders 1..6 built from the column above.
group = part.names.index("conv1")  # the convolution, just before BatchNorm


def along(t: float) -> float:
    moved = {k: v + t * u[k] if k in part.groups[group] else v for k, v in params.items()}
    return float(loss(moved))


ts = torch.linspace(-0.3, 0.3, 81, dtype=torch.float64)
exact = [along(float(t)) for t in ts]
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
left.plot(ts, exact, "k", lw=2.5, label="L(θ + t u_s)")
for d in orders:
    poly = exact[40] + sum(
        taylor[k - 1, group] * ts**k / math.factorial(k) for k in range(1, d + 1)
    )
    left.plot(ts, poly, lw=1, label=f"order {d}")
left.set_ylim(min(exact) - 0.05, max(exact) + 0.05)
left.set_xlabel("t (convolution group)")
left.set_ylabel("loss")
left.legend(fontsize=7)
left.set_title("Taylor polynomials from diag D^(1..6)")
right.semilogy(list(orders), error.clamp_min(1e-17), "o-")
right.set_xlabel("order d")
right.set_ylabel("max relative error vs hos.reference")
right.set_title("Taylor mode against the oracle")
fig.tight_layout()

# the polynomials close in on the loss near t = 0
near = ts.abs() <= 0.02
gaps = []
for d in (1, 3, 6):
    poly = exact[40] + sum(
        taylor[k - 1, group] * ts**k / math.factorial(k) for k in range(1, d + 1)
    )
    gaps.append(float((poly - torch.tensor(exact)).abs()[near].max()))
print("max |L − Taylor| on |t| <= 0.02, orders 1, 3, 6:", [f"{g:.1e}" for g in gaps])
assert gaps[0] > gaps[1] > gaps[2], gaps

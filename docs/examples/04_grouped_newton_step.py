"""A GroupedNewton step, checked on closed forms

Three checks of the step θ ← θ − Σ_s η*_s u_s (see [the math](../math.md#the-groupednewton-step)):

1. on a quadratic, D³ = 0, so the cubic term vanishes and η* = H̄⁻¹ḡ: the step lands on the
   minimiser of the loss over θ + span{u_1, …, u_S}, where the new gradient is orthogonal to
   every u_s;
2. with one group (S = 1) the cubic model is a scalar one, minimised in closed form by
   η* = 2ḡ / (H̄ + √(H̄² + 2λ|d₃||ḡ|));
3. on a small network (S = 2) η* satisfies the fixed-point equation
   η = (H̄ + ½λ‖Dη‖D²)⁻¹ḡ with H̄ + ½λ‖Dη‖D² ⪰ 0, and no other η has a lower model value.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import hos
from hos.optim import cubic_model, cubic_model_step, grouped_newton_lrs

torch.manual_seed(0)
f64 = torch.float64

# %%
# **1. A quadratic.** L(θ) = ½θᵀAθ − bᵀθ over two tensors "a" and "b" (S = 2), u = ∇L.
M = torch.randn(6, 6, dtype=f64)
A = M @ M.T + 0.5 * torch.eye(6, dtype=f64)
b = torch.randn(6, dtype=f64)


def quadratic(p):
    theta = torch.cat([p["a"], p["b"]])
    return 0.5 * theta @ A @ theta - b @ theta


params = {"a": torch.randn(3, dtype=f64), "b": torch.randn(3, dtype=f64)}
theta0 = torch.cat([params["a"], params["b"]])
grad0 = A @ theta0 - b
u = {"a": grad0[:3], "b": grad0[3:]}
part = hos.Partition.per_tensor(params)

new, info = cubic_model_step(quadratic, params, u, part, damping=1.0)

Umat = torch.zeros(6, 2, dtype=f64)  # the columns are u_a and u_b, zero-padded
Umat[:3, 0], Umat[3:, 1] = grad0[:3], grad0[3:]
g_bar, H_bar = Umat.T @ grad0, Umat.T @ A @ Umat
eta_closed = torch.linalg.solve(H_bar, g_bar)
print("quadratic: eta* =", info.solution.eta.numpy(), " H̄⁻¹ḡ =", eta_closed.numpy())
assert info.summary.d3.abs().max() < 1e-12
assert torch.allclose(info.solution.eta, eta_closed, rtol=1e-10)
grad1 = A @ torch.cat([new["a"], new["b"]]) - b
assert (Umat.T @ grad1).abs().max() < 1e-10 * grad0.norm()  # new gradient ⟂ u_a, u_b

# %%
# **2. One group.** A small tanh network under cross-entropy, S = 1, u = a random direction.
net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
x, y = torch.randn(40, 4, dtype=f64), torch.randint(0, 3, (40,))
loss = hos.model_loss(net, nn.CrossEntropyLoss(), x, y)
theta = {k: p.detach() for k, p in net.named_parameters()}
v = {k: torch.randn_like(p) for k, p in theta.items()}
lam = 1.0

s1 = hos.summarize(loss, theta, v, hos.Partition.whole(net))
g1, h1, d1 = s1.g[0], s1.H[0, 0], s1.d3[0]
eta1 = grouped_newton_lrs(s1.g, s1.H, s1.d3, damping=lam)
closed = 2 * g1 / (h1 + torch.sqrt(h1**2 + 2 * lam * d1.abs() * g1.abs()))
print(f"S = 1: eta* = {eta1.item():.10f}, closed form = {closed.item():.10f}")
assert torch.allclose(eta1, closed.reshape(1), rtol=1e-10)

# %%
# **3. Two groups** (the two layers): the optimality conditions of the cubic model.
part2 = hos.Partition.per_layer(net)
s2 = hos.summarize(loss, theta, v, part2)
sol = hos.optim.solve_cubic(s2.g, s2.H, s2.d3, damping=lam)
eta = sol.eta
D = s2.d3.abs().pow(1 / 3)
r = (D * eta).norm()
K = s2.H + 0.5 * lam * r * torch.diag(D**2)
print(f"S = 2: eta* = {eta.numpy()}, status = {sol.status.value}, ‖Dη‖ = {r.item():.4f}")
print("       eigenvalues of H̄ + λ/2‖Dη‖D²:", torch.linalg.eigvalsh(K).numpy())
assert torch.allclose(K @ eta, s2.g, rtol=1e-9, atol=1e-12)
assert torch.linalg.eigvalsh(K).min() >= -1e-10


def model_values(etas):  # m(η) for a batch of η, written out from its definition
    quad = 0.5 * torch.einsum("ni,ij,nj->n", etas, s2.H, etas)
    return -etas @ s2.g + quad + lam / 6 * (etas * D).norm(dim=1) ** 3


m_star = cubic_model(eta, s2.g, s2.H, s2.d3, lam)
assert torch.allclose(model_values(eta[None]), m_star)
cloud = eta + 2 * (eta.abs().max() + 1e-3) * torch.randn(20000, 2, dtype=f64)
assert m_star <= model_values(cloud).min() + 1e-12

# %%
# The model m(η) over the two learning rates, with its global minimiser η*.
span = 2.5 * eta.abs().max().item() + 1e-3
e1, e2 = torch.meshgrid(
    torch.linspace(eta[0] - span, eta[0] + span, 121, dtype=f64),
    torch.linspace(eta[1] - span, eta[1] + span, 121, dtype=f64),
    indexing="ij",
)
pts = torch.stack([e1.flatten(), e2.flatten()], 1)
vals = model_values(pts).reshape(e1.shape)
fig, ax = plt.subplots(figsize=(5.2, 4.2))
cs = ax.contourf(e1.numpy(), e2.numpy(), vals.numpy(), levels=30, cmap="viridis")
fig.colorbar(cs, ax=ax, label="m(η)")
ax.plot(*eta.numpy(), "r*", ms=14, label="η* (hos.optim.solve_cubic)")
ax.plot(0, 0, "wo", ms=6, label="η = 0 (no step)")
ax.set_xlabel(f"η for layer {part2.names[0]}")
ax.set_ylabel(f"η for layer {part2.names[1]}")
ax.set_title("GroupedNewton's cubic model, λ_int = 1")
ax.legend(loc="upper right", fontsize=8)
fig.tight_layout()

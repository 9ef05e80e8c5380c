"""How the layers of a small CNN interact

LeNet (tanh) on real 8×8 digits, one group per layer, the direction u = the minibatch
gradient. H̄ = D² is then the S×S matrix of second derivatives of the loss when each layer
moves along its own part of the gradient: `H̄[i, j] = u_iᵀ H u_j`. The diagonal is each
layer's curvature along its own gradient; the off-diagonal entries are the couplings that a
block-diagonal approximation (K-FAC, per-layer learning rates tuned alone) sets to zero.
We check H̄ against `hos.reference` and draw it normalised to
`C[i, j] = H̄[i, j] / √(|H̄[i, i]| |H̄[j, j]|)`, which is scale-free. When H̄ ⪰ 0 it lies in
[−1, 1]; an entry beyond ±1 says the 2×2 block (i, j) of H̄ is indefinite — at this random
initialisation the convolutions have negative curvature along their own gradient.
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import hos
from hos import reference
from hos.datasets import load_dataset
from hos.models import build_model
from hos.plotting import interaction_heatmap, normalized_interactions, readable_labels

data = load_dataset("digits", seed=0)
x, y = data.train.tensors
x, y = x[:32].double(), y[:32]
net = build_model("lenet", data.input_shape, data.num_classes, seed=0).double()
criterion = nn.CrossEntropyLoss()
loss = hos.model_loss(net, criterion, x, y)
params = {k: p.detach() for k, p in net.named_parameters()}
part = hos.Partition.per_layer(net)
print("layers:", part.names)

# %%
# The direction: the gradient of this minibatch (any dict with the shapes of θ works;
# hos.momentum_direction and hos.random_direction give the other usual choices).
u = hos.gradient_direction(loss, params)

H = hos.summary_tensor(loss, params, u, part, order=2)
H_ref = reference.summary_tensor(loss, params, u, part, order=2)
print(f"max |H - reference| / max |H| = {((H - H_ref).abs().max() / H.abs().max()).item():.1e}")
assert torch.allclose(H, H_ref, rtol=1e-9, atol=1e-12 * H.abs().max().item())

# %%
# With u = ∇L, ḡ[s] = ‖∇_s L‖² (each layer's squared gradient norm), and merging every layer
# into one group sums the entries: the whole-network H̄ is Σ_ij H̄[i, j] = gᵀHg.
g = hos.summary_tensor(loss, params, u, part, order=1)
per_layer = torch.stack([sum(u[n].pow(2).sum() for n in group) for group in part.groups])
assert torch.allclose(g, per_layer, rtol=1e-10)
H_whole = hos.summary_tensor(loss, params, u, hos.Partition.whole(net), order=2)
assert torch.allclose(H_whole, H.sum().reshape(1, 1), rtol=1e-9)

scale = H.diagonal().abs().sqrt()
C = H / torch.outer(scale, scale)
print("normalised H̄:\n", C.numpy().round(2))
assert torch.allclose(torch.as_tensor(normalized_interactions(H)), C)

# %%
# The heatmap, with `hos.plotting`. Read it row by row: a large |C[i, j]| means that moving
# layer j along its gradient changes the slope seen by layer i as much as layer i's own move
# does. Colours stop at ±1; a value beyond (written in the cell, gold frame) marks an
# indefinite 2×2 block. `readable_labels` names the layers conv1, conv2, fc1, ...
fig, ax = plt.subplots(figsize=(5.4, 4.4))
labels = readable_labels(net, part.names)
interaction_heatmap(H, labels, ax=ax, title="LeNet on digits, u = gradient")
fig.tight_layout()

"""A Hugging Face Trainer with the summary callback

A tiny GPT-2 (built from a config, random weights, nothing downloaded) learns a toy
corpus with `transformers.Trainer`. `hos.integrations.huggingface.SummaryCallback` records the
summary of the model's own language-model loss (`labels` in the batch) every 5 steps, per
block of the network.
"""

import logging
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import transformers

import hos
from hos import plotting
from hos.integrations.huggingface import SummaryCallback

transformers.logging.set_verbosity_error()
logging.getLogger("accelerate").setLevel(logging.ERROR)
text = "the quick brown fox jumps over the lazy dog. " * 40
vocab = sorted(set(text))
ids = torch.tensor([vocab.index(c) for c in text])
rows = [{"input_ids": ids[i : i + 16], "labels": ids[i : i + 16]} for i in range(0, 1600, 16)]

config = transformers.GPT2Config(
    vocab_size=len(vocab), n_positions=16, n_embd=16, n_layer=2, n_head=2,
    attn_implementation="eager",
)  # fmt: skip
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(config)

# %%
# Groups: the embeddings, each transformer block, the final norm (lm_head is tied to the
# token embedding, so it is the same tensor).
groups = {"embeddings": ["transformer.wte.weight", "transformer.wpe.weight"]}
for b in range(config.n_layer):
    groups[f"block {b}"] = [
        k for k, _ in model.named_parameters() if k.startswith(f"transformer.h.{b}.")
    ]
groups["final norm"] = ["transformer.ln_f.weight", "transformer.ln_f.bias"]
partition = hos.Partition.from_groups(model, groups)
probe = {"input_ids": torch.stack([r["input_ids"] for r in rows[:8]])}
probe["labels"] = probe["input_ids"]

folder = Path(tempfile.mkdtemp())
callback = SummaryCallback(probe, every=5, partition=partition, log_dir=folder / "hos")
args = transformers.TrainingArguments(
    output_dir=str(folder / "out"), max_steps=30, per_device_train_batch_size=8,
    learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
    disable_tqdm=True,
)  # fmt: skip
transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()

# %%
run = hos.load_log(folder / "hos")
print("steps:", run.steps.tolist())
print("loss on the probe batch:", run.loss.round(3).tolist())
assert run.steps.tolist() == [0, 5, 10, 15, 20, 25]
assert run.loss[-1] < run.loss[0]  # it learns
plotting.log_heatmaps(run, panels=3)
plotting.log_series(run, "g")
plt.show()

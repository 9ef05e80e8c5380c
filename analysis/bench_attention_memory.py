"""Attention's memory in `summarize`: the rows' attention op and the decomposition's blocks.

    python analysis/bench_attention_memory.py            # ~3 min on 2 CPU cores
    python analysis/bench_attention_memory.py --quick    # seconds: short sequences

Issue 28 asks for `summarize` within 4× a gradient's memory at large S. On attention two things
held more (``hos._attention``): the graph of the rows of H̄ kept the (L × L) tensors of
attention's backward (dP, dS) for every layer — now one op keeps q, k, v and P and recomputes
them — and the Taylor passes held the (L × L) intermediates of the whole batch with their
coefficient stacks — now the decomposition goes a block of the batch at a time where no graph is
recorded. Per model (the 6-layer transformer of ``analysis/problems.py``, batch 8, 64 tokens,
`nn.MultiheadAttention`; a 4-layer Hugging Face GPT-2, n_embd 64, 4 heads, 128 tokens, batch 4,
`F.scaled_dot_product_attention`; per tensor; float32), three variants in one process:

* `decomposition`: both off (the attention op out of ``REWRITTEN_AT_SECOND_ORDER``, blocks off);
* `op`: the rows' attention op only;
* `op + blocks`: both (the default).

Each gets the tensors' peak (``toolkit.tensor_peak``: the CPU allocator's events) of
``summarize``, of the rows alone (``summary_tensor(order=2, backend="reverse")``: the forward
graph, the first backward's graph, one row at a time) and of the Taylor passes alone
(``summary_diagonal(order=3)``), and `summarize`'s best time of `--repeats` calls; the unit is
one plain ``criterion(model(x), y).backward()`` on the module, its tensors' peak and its time in
the same process. Writes ``analysis/results/bench_attention_memory.json`` and the docs' table
``analysis/results/tables/attention_memory.md``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from problems import build_problem, parse, parser, plain_backward_fn  # noqa: E402

import hos  # noqa: E402
import hos._attention as attention  # noqa: E402
import hos._exact as exact  # noqa: E402

RESULTS = toolkit.RESULTS / "bench_attention_memory.json"
VARIANTS = ("decomposition", "op", "op + blocks")
NAMES = {"transformer6": "6-layer transformer (64 tokens)", "gpt2": "GPT-2, 4 layers (128 tokens)"}


def _gpt2(tokens: int, batch: int):
    """(loss, θ, u, partition) of a Hugging Face GPT-2 with random weights (sdpa attention)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=tokens, n_embd=64, n_layer=4, n_head=4,
                        attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 100, (batch, tokens), generator=torch.Generator().manual_seed(1))

    def criterion(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))

    loss = hos.model_loss(model, criterion, {"input_ids": ids}, ids, output="logits")
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    u = {k: 1e-2 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    return loss, params, u, hos.Partition.per_tensor(model)


def problem(name: str, quick: bool):
    if name == "gpt2":
        return _gpt2(16 if quick else 128, 2 if quick else 4)
    _, loss, params, u, part = build_problem(name, 2 if quick else 8)
    return loss, params, u, part


@contextlib.contextmanager
def variant(name: str):
    """`name` of `VARIANTS` switched on for the block (module attributes, restored after)."""
    table, blocks = exact.REWRITTEN_AT_SECOND_ORDER, attention.BLOCK_SCORES
    attention_ops = (F.scaled_dot_product_attention, F.multi_head_attention_forward)
    if name == "decomposition":
        exact.REWRITTEN_AT_SECOND_ORDER = {
            f: rule for f, rule in table.items() if f not in attention_ops
        }
    if name != "op + blocks":
        attention.BLOCK_SCORES = 2**62
    try:
        yield
    finally:
        exact.REWRITTEN_AT_SECOND_ORDER, attention.BLOCK_SCORES = table, blocks


def measure(name: str, args) -> dict:
    loss, params, u, part = problem(name, args.quick)
    plain = plain_backward_fn(loss)
    plain()
    unit = {"tensor_mib": toolkit.tensor_peak(plain), "seconds": toolkit.best_time(plain, 5)}
    calls = {
        "summarize": lambda: hos.summarize(loss, params, u, part),
        "rows": lambda: hos.summary_tensor(loss, params, u, part, 2, backend="reverse"),
        "passes": lambda: hos.summary_diagonal(loss, params, u, part, 3),
    }
    out = {"S": len(part), "plain_backward": unit, "variants": {}}
    for v in VARIANTS:
        with variant(v):
            for fn in calls.values():  # warm: lazy imports, each call's first-sight check
                fn()
            row = {f"{k}_mib": toolkit.tensor_peak(fn) for k, fn in calls.items()}
            row["summarize_seconds"] = toolkit.best_time(calls["summarize"], args.repeats)
        out["variants"][v] = row
        toolkit.log(f"{name} {v}: {row}")
    return out


def table(models: dict) -> str:
    """The docs' table: tensors' peaks in MiB and × a plain backward's, `summarize`'s time."""
    lines = ["| model | S | plain backward | variant | `summarize` | rows of H̄ | Taylor passes | "
             "`summarize` time |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, m in models.items():
        unit = m["plain_backward"]
        for v, row in m["variants"].items():
            cells = [f"{row[k]:.1f} MiB ({row[k] / unit['tensor_mib']:.1f}×)"
                     for k in ("summarize_mib", "rows_mib", "passes_mib")]  # fmt: skip
            speed = row["summarize_seconds"] / unit["seconds"]
            lines.append(
                f"| {NAMES.get(name, name)} | {m['S']} | {unit['tensor_mib']:.1f} MiB, "
                f"{unit['seconds'] * 1e3:.0f} ms | {v} | "
                + " | ".join(cells)
                + f" | {row['summarize_seconds']:.2f} s ({speed:.0f}×) |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    options = parser(__doc__.splitlines()[0], ["run"])
    options.set_defaults(results=RESULTS)
    args = parse(options, argv)
    if args.quick and args.results == RESULTS:
        args.results = RESULTS.with_name("bench_attention_memory_quick.json")
    torch.set_num_threads(args.threads)
    models = {}
    for name in ("transformer6", "gpt2"):
        try:
            models[name] = measure(name, args)
        except ModuleNotFoundError as err:  # GPT-2 needs the models extra (transformers)
            toolkit.log(f"{name} skipped: {err}")
    toolkit.update_json(args.results, {"models": models}, "environment", dtype="float32",
                        unit="plain backward")  # fmt: skip
    toolkit.log(f"wrote {args.results}")
    if not args.quick and toolkit.OUT is None:
        toolkit.save_table(table(models), "attention_memory.md")


if __name__ == "__main__":
    main()

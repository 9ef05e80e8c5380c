"""The one-pass summary with and without its cuts: FLOPs, time and memory on small partitions.

    python analysis/bench_pair_cuts.py            # ~6 min on 2 CPU cores
    python analysis/bench_pair_cuts.py --quick    # seconds: the MLP on 8 samples

For S <= 12 groups `hos.summarize` computes (ḡ, H̄, diag D³) in one forward pass that carries the
Taylor coefficients along every group's line and the mixed ones of every pair. The top rows of
that pass (x_3 along each line, x_ij of each pair, a layer's pairs with its own weight) enter
the loss only through ⟨∂L/∂x, ·⟩ at every layer linear in its input, so the pass contracts them
there with the gradient of its own primal graph (`hos.taylor.cuts.PairCutTracker`) instead of
pushing them through the layer. This script measures three settings of the same call, rounds
interleaved in one process (1 thread, float32, after two warm calls each):

* `whole`: the pass as it was (``PAIR_CUTS = False``);
* `cuts`: x_3 and x_ij contracted (``CROSS_MIN_LINES`` and ``CROSS_MIN_LINES_ONE_PRODUCT`` out
  of reach);
* `cuts + own weight`: also the layers' own-weight pairs, where the input carries 3 lines or more
  (2 for `F.linear` and x @ W, whose adjoint is one product) (the default).

Past `PAIR_DEFER_BYTES` of jets kept alive by the pass's graph, a loss's first call times the
pass with δ from a backward beforehand (x_3 and x_ij cut, no own-weight pairs) against the pass
whole and settles on the faster; the table marks the settings that took δ beforehand.

Models: the paper MLP and LeNet-5 per tensor (batch 100), the 6-layer transformer (batch 8) and
ResNet-18 (batch 4) in 8 contiguous blocks of tensors (the paper's per-layer use). Per setting:
the products' FLOPs (``torch.utils.flop_counter`` formulas at the dispatcher) and the best and
median time as multiples of one plain ``criterion(model(x), y).backward()`` on the module, the
peak of tensors held (`toolkit.tensor_peak`) as a multiple of the gradient's, and the largest
difference of H̄ and diag D³ from the whole pass relative to their largest entry (the settings
compute the same numbers). Writes ``analysis/results/bench_pair_cuts.json`` and the docs' table
``analysis/results/tables/pair_cuts.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)
from bench_flops import count  # noqa: E402
from problems import TITLES, build_problem, plain_backward_fn  # noqa: E402

import hos  # noqa: E402
from hos.backends import taylor  # noqa: E402
from hos.taylor import cuts  # noqa: E402

#: setting -> (PAIR_CUTS, (CROSS_MIN_LINES, CROSS_MIN_LINES_ONE_PRODUCT) or None: the defaults)
SETTINGS = {
    "whole": (False, None),
    "cuts": (True, (10**9, 10**9)),
    "cuts + own weight": (True, None),
}
DEFAULT_LINES = (cuts.CROSS_MIN_LINES, cuts.CROSS_MIN_LINES_ONE_PRODUCT)
#: (model, batch, partition: "tensor" or "blocks<k>")
CASES = (("mlp", 100, "tensor"), ("lenet", 100, "tensor"), ("transformer6", 8, "blocks8"),
         ("resnet18", 4, "blocks8"))  # fmt: skip


def setting(name: str) -> None:
    flag, lines = SETTINGS[name]
    taylor.PAIR_CUTS = flag
    cuts.CROSS_MIN_LINES, cuts.CROSS_MIN_LINES_ONE_PRODUCT = lines or DEFAULT_LINES


def partition(model, params, how: str) -> hos.Partition:
    if how == "tensor":
        return hos.Partition.per_tensor(model)
    k, names = int(how.removeprefix("blocks")), list(params)
    n = len(names)
    blocks = {f"block {i}": names[i * n // k : (i + 1) * n // k] for i in range(k)}
    return hos.Partition.from_groups(model, blocks)


def measure(name: str, batch: int, how: str, rounds: int) -> dict:
    model, loss, params, u, _ = build_problem(name, batch)
    part = partition(model, params, how)
    plain = plain_backward_fn(loss)
    results, summaries, modes = {}, {}, {}
    for s in SETTINGS:
        setting(s)
        for _ in range(2):
            summaries[s] = hos.summarize(loss, params, u, part)
            plain()
        if hos.last_fallback() is not None:
            raise AssertionError(f"{name}: the one-pass summary fell back: {hos.last_fallback()}")
        settled = taylor._SETTLED.get(loss, {})
        modes[s] = "whole" if not taylor.PAIR_CUTS else next(iter(settled.values()), "after")
    gradient_flops, _ = count(plain)
    gradient_mib = toolkit.tensor_peak(plain)
    for s in SETTINGS:
        setting(s)
        flops, _ = count(lambda: hos.summarize(loss, params, u, part))
        results[s] = {
            "mode": modes[s],
            "flop_ratio": flops / gradient_flops,
            "memory_ratio": toolkit.tensor_peak(lambda: hos.summarize(loss, params, u, part))
            / gradient_mib,
            "H_difference": _relative(summaries[s].H, summaries["whole"].H),
            "d3_difference": _relative(summaries[s].d3, summaries["whole"].d3),
        }
    times: dict[str, list[float]] = {s: [] for s in (*SETTINGS, "gradient")}
    for _ in range(rounds):  # interleaved, so that the settings share the machine's load
        for s in SETTINGS:
            setting(s)
            times[s].append(toolkit.timed(lambda: hos.summarize(loss, params, u, part))[1])
        times["gradient"].append(toolkit.timed(plain)[1])
    setting("cuts + own weight")
    unit = min(times["gradient"])
    for s in SETTINGS:
        results[s].update(best=min(times[s]) / unit, median=statistics.median(times[s]) / unit)
    out = {"S": len(part), "batch": batch, "partition": how, "gradient_seconds": unit,
           "gradient_flops": gradient_flops, "gradient_mib": gradient_mib, "settings": results}  # fmt: skip
    toolkit.log(f"{name} ({how}, S = {len(part)}): " + "; ".join(
        f"{s} {r['flop_ratio']:.2f}x FLOPs, {r['best']:.2f}x time" for s, r in results.items()))  # fmt: skip
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


#: how a setting's passes ran: the deferred cuts, δ beforehand (the deferred ones outgrew
#: `PAIR_DEFER_BYTES` and the timing chose it), whole
_MARK = {"after": "", "before": " (δ beforehand)", "whole": ""}


def table(results: dict) -> str:
    head = " | ".join(f"{s}: FLOPs, time best / median, memory" for s in SETTINGS)
    lines = [
        f"| model | groups | batch | {head} |",
        "| --- | --- | --- |" + " --- |" * len(SETTINGS),
    ]
    for name, r in results.items():
        groups = f"{r['S']} ({'per tensor' if r['partition'] == 'tensor' else '8 blocks'})"
        cells = [f"{c['flop_ratio']:.2f}×, {c['best']:.2f}× / {c['median']:.2f}×, "
                 f"{c['memory_ratio']:.2f}×{_MARK[c['mode']]}" for c in r["settings"].values()]  # fmt: skip
        lines.append(f"| {TITLES.get(name, name)} | {groups} | {r['batch']} | " + " | ".join(cells)
                     + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = (("mlp", 8, "tensor"),) if args.quick else CASES
    start = time.perf_counter()
    results = {m: measure(m, b, how, 2 if args.quick else args.rounds) for m, b, how in cases}
    name = f"bench_pair_cuts{'_quick' if args.quick else ''}.json"
    toolkit.save_json({"models": results, "unit": "one plain loss.backward() on the module",
                       "threads": 1, "dtype": "float32",
                       "seconds": time.perf_counter() - start}, name)  # fmt: skip
    if not args.quick:
        toolkit.save_table(table(results), "pair_cuts.md")
    toolkit.log(table(results))


if __name__ == "__main__":
    main()

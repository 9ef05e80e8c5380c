"""A/B timing of two checkouts of hos in alternating fresh processes (noise-robust).

    git worktree add /tmp/hos-old <commit>
    python analysis/ab_revisions.py /tmp/hos-old . --rounds 3

Each round runs one process per checkout, in turn; a process times the default backend's
``summarize``, ``summary_tensor(order=3)`` and ``summary_diagonal(order=4)`` on the paper MLP
and LeNet-5 (batch 100, float32, 2 threads) as ratios to a plain ``loss.backward()`` on the
module timed just before each measurement (not through ``hos.model_loss``: a unit that does
not change with the checkout) (5 interleaved measurements, median; the problems of each checkout's
``analysis/problems.py``, or of its ``bench_summaries.py`` before the split, the timing of
this one's ``toolkit.best_time``). ``--large`` times ``summarize`` on the large-model
section's ResNet-18 (batch 4, S = 62) and 6-layer transformer (batch 8, S = 79) instead (3
measurements each, one call per measurement after a warm one). The report is the median over
rounds of each checkout, and the relative change. Writes analysis/results/ab_revisions.json
(``ab_revisions_large.json`` with ``--large``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toolkit  # noqa: E402  (analysis/toolkit.py: outputs, timing)

CHILD = r"""
import sys, json, importlib.util
root, here, large = sys.argv[1], sys.argv[2], sys.argv[3] == "large"
sys.path[:0] = [root, root + "/analysis"]
import torch; torch.set_num_threads(2)
import hos
assert hos.__file__.startswith(root), hos.__file__
try:  # the checkout's own problems
    from problems import build_problem
except ImportError:  # a checkout from before bench_summaries.py was split
    from bench_summaries import build_problem
spec = importlib.util.spec_from_file_location("ab_toolkit", here + "/toolkit.py")
toolkit = importlib.util.module_from_spec(spec); spec.loader.exec_module(toolkit)
out = {}
cases = [("resnet18", 4), ("transformer6", 8)] if large else [("mlp", 100), ("lenet", 100)]
for name, batch in cases:
    model, loss, params, u, part = build_problem(name, batch)

    def grad():  # the unit: a plain backward on the module, the same code for both checkouts
        model.zero_grad(set_to_none=True)
        loss.criterion(model(loss.inputs), loss.targets).backward()
    fns = {"summarize": lambda: hos.summarize(loss, params, u, part)}
    if not large:
        fns["D3"] = lambda: hos.summary_tensor(loss, params, u, part, 3)
        fns["diag4"] = lambda: hos.summary_diagonal(loss, params, u, part, 4)
    for op, fn in fns.items():
        fn()
        best = lambda f, n: toolkit.best_time(f, n, warm=not large, collect=True)  # same for both
        ratios = sorted(best(fn, 1) / best(grad, 3) for _ in range(3 if large else 5))
        out[f"{name} {op}"] = ratios[len(ratios) // 2]
print(json.dumps(out))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="ResNet-18 and the transformer")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)
    name = "ab_revisions_large.json" if args.large else "ab_revisions.json"
    results = args.results or toolkit.RESULTS / name
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label in ("old", "new"):
            root = str(getattr(args, label).resolve())
            here = str(Path(__file__).resolve().parent)
            cmd = [sys.executable, "-c", CHILD, root, here, "large" if args.large else "small"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {}
    for key in runs["old"][0]:
        old = statistics.median(r[key] for r in runs["old"])
        new = statistics.median(r[key] for r in runs["new"])
        report[key] = {"old": old, "new": new, "change": new / old - 1}
        print(f"{key:16s} old {old:6.2f}x  new {new:6.2f}x  {100 * (new / old - 1):+5.1f} %")
    payload = {"rounds": runs, "report": report, "old": str(args.old), "new": str(args.new)}
    print(f"wrote {toolkit.save_json(payload, results)}")


if __name__ == "__main__":
    main()

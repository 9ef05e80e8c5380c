"""A/B timing of two checkouts of hos in alternating fresh processes (noise-robust).

    git worktree add /tmp/hos-old <commit>
    python analysis/ab_revisions.py /tmp/hos-old . --rounds 3

Each round runs one process per checkout, in turn; a process times the default backend's
``summarize``, ``summary_tensor(order=3)`` and ``summary_diagonal(order=4)`` on the paper MLP
and LeNet-5 (batch 100, float32, 2 threads) as ratios to a gradient timed just before each
measurement (5 interleaved measurements, median). The report is the median over rounds of
each checkout, and the relative change. Writes analysis/results/ab_revisions.json.
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

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import sys, json
root = sys.argv[1]; sys.path[:0] = [root, root + "/analysis"]
import torch; torch.set_num_threads(2)
import hos, bench_summaries as B
assert hos.__file__.startswith(root), hos.__file__
out = {}
for name in ("mlp", "lenet"):
    model, loss, params, u, part = B.build_problem(name, 100)
    grad = B.gradient_fn(loss, params)
    fns = {"summarize": lambda: hos.summarize(loss, params, u, part),
           "D3": lambda: hos.summary_tensor(loss, params, u, part, 3),
           "diag4": lambda: hos.summary_diagonal(loss, params, u, part, 4)}
    for op, fn in fns.items():
        fn()
        ratios = sorted(B.best_time(fn, 1) / B.best_time(grad, 3) for _ in range(5))
        out[f"{name} {op}"] = ratios[2]
print(json.dumps(out))
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, default=toolkit.RESULTS / "ab_revisions.json")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for label in ("old", "new"):
            root = str(getattr(args, label).resolve())
            done = subprocess.run([sys.executable, "-c", CHILD, root], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    report = {}
    for key in runs["old"][0]:
        old = statistics.median(r[key] for r in runs["old"])
        new = statistics.median(r[key] for r in runs["new"])
        report[key] = {"old": old, "new": new, "change": new / old - 1}
        print(f"{key:16s} old {old:6.2f}x  new {new:6.2f}x  {100 * (new / old - 1):+5.1f} %")
    args.results.write_text(
        json.dumps(
            {"rounds": runs, "report": report, "old": str(args.old), "new": str(args.new)}, indent=1
        )
    )


if __name__ == "__main__":
    main()

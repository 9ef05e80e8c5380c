"""The docs' generated tables are the committed JSON's: a benchmark script writes each table from
its results (`analysis/toolkit.save_table`), the docs include it as a snippet, and this test
regenerates it, so a number in the docs cannot drift from the measurement."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "analysis" / "results" / "tables"


def test_memory_table_is_generated_from_the_committed_json():
    from analysis import bench_memory

    results = json.loads((ROOT / "analysis/results/bench_summaries.json").read_text())
    expected = bench_memory.memory_table(results["memory"]) + "\n"
    assert (TABLES / "memory.md").read_text() == expected
    assert '--8<-- "memory.md"' in (ROOT / "docs/benchmarks.md").read_text()


def test_a_changed_measurement_changes_the_table():
    from analysis import bench_memory

    results = json.loads((ROOT / "analysis/results/bench_summaries.json").read_text())
    before = bench_memory.memory_table(results["memory"])
    results["memory"]["mlp"]["hos.taylor summarize"]["peak_mib"] *= 2
    assert bench_memory.memory_table(results["memory"]) != before


def test_hessian_alone_table_is_generated_from_the_committed_json():
    from analysis import bench_hessian_alone

    results = json.loads((ROOT / "analysis/results/bench_hessian_alone.json").read_text())
    expected = bench_hessian_alone.table(results["models"]) + "\n"
    assert (TABLES / "hessian_alone.md").read_text() == expected
    assert '--8<-- "hessian_alone.md"' in (ROOT / "docs/benchmarks.md").read_text()


def test_partition_sweep_tables_are_generated_from_the_committed_json():
    from analysis import partition_sweep

    results = json.loads((ROOT / "analysis/results/partition_sweep.json").read_text())
    page = (ROOT / "docs/results.md").read_text()
    for name, payload in results["datasets"].items():
        expected = partition_sweep.table(payload) + "\n"
        assert (TABLES / f"partition_sweep_{name}.md").read_text() == expected
        assert f'--8<-- "partition_sweep_{name}.md"' in page

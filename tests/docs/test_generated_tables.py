"""The docs' generated tables are the committed JSON's: a benchmark script writes each table from
its results (`analysis/toolkit.save_table`), the docs include it as a snippet, and this test
regenerates it, so a number in the docs cannot drift from the measurement."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLES = ROOT / "analysis" / "results" / "tables"


def _committed(name: str) -> dict:
    return json.loads((ROOT / "analysis" / "results" / name).read_text())


def _check(table: str, markdown: str, page: str) -> None:
    """`TABLES/table` is `markdown` and the docs page `page` includes it."""
    assert (TABLES / table).read_text() == markdown + "\n"
    assert f'--8<-- "{table}"' in (ROOT / "docs" / page).read_text()


def test_memory_table_is_generated_from_the_committed_json():
    from analysis import bench_memory

    memory = _committed("bench_summaries.json")["memory"]
    _check("memory.md", bench_memory.memory_table(memory), "benchmarks.md")


def test_a_changed_measurement_changes_the_table():
    from analysis import bench_memory

    results = _committed("bench_summaries.json")
    before = bench_memory.memory_table(results["memory"])
    results["memory"]["mlp"]["hos.taylor summarize"]["peak_mib"] *= 2
    assert bench_memory.memory_table(results["memory"]) != before


def test_hessian_alone_table_is_generated_from_the_committed_json():
    from analysis import bench_hessian_alone

    models = _committed("bench_hessian_alone.json")["models"]
    _check("hessian_alone.md", bench_hessian_alone.table(models), "benchmarks.md")


def test_partition_sweep_tables_are_generated_from_the_committed_json():
    from analysis import partition_sweep

    for name, payload in _committed("partition_sweep.json")["datasets"].items():
        _check(f"partition_sweep_{name}.md", partition_sweep.table(payload), "results.md")


def test_large_model_tables_are_generated_from_the_committed_json():
    from analysis import bench_large_models

    large = _committed("bench_summaries.json")["large"]
    _check("large_models.md", bench_large_models.table(large), "benchmarks.md")
    _check("large_models_bounds.md", bench_large_models.bounds_table(large), "benchmarks.md")
    _check("large_models_plain.md", bench_large_models.plain_table(large), "benchmarks.md")

"""The docs' generated tables are the committed JSON's: a benchmark script writes each table from
its results (`analysis/toolkit.save_table`), the docs include it as a snippet, and this test
regenerates it, so a number in the docs cannot drift from the measurement."""

import json
from pathlib import Path

import pytest

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


def test_flops_table_is_generated_from_the_committed_json():
    from analysis import bench_flops

    _check("flops.md", bench_flops.table(_committed("bench_flops.json")["models"]), "benchmarks.md")
    kept = _committed("bench_flops_kept.json")
    assert kept["keep_freed_memory"]
    _check("flops_kept.md", bench_flops.table(kept["models"]), "benchmarks.md")


def test_pair_cuts_table_is_generated_from_the_committed_json():
    from analysis import bench_pair_cuts

    models = _committed("bench_pair_cuts.json")["models"]
    _check("pair_cuts.md", bench_pair_cuts.table(models), "benchmarks.md")


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


def test_attention_memory_table_is_generated_from_the_committed_json():
    from analysis import bench_attention_memory

    models = _committed("bench_attention_memory.json")["models"]
    assert set(models) == {"transformer6", "gpt2"}
    _check("attention_memory.md", bench_attention_memory.table(models), "benchmarks.md")


def test_summaries_tables_are_generated_from_the_committed_json():
    from analysis import bench_summaries

    results = _committed("bench_summaries.json")
    _check("summaries.md", bench_summaries.ratios_table(results["ratios"]), "benchmarks.md")
    _check("summaries_scaling.md", bench_summaries.scaling_table(results["scaling"]),
           "benchmarks.md")  # fmt: skip
    _check("summaries_order.md", bench_summaries.order_table(results["scaling"]), "benchmarks.md")
    _check("summaries_certificate.md", bench_summaries.certificate_table(results["certificate"]),
           "howto/soundness.md")  # fmt: skip


def test_every_ratio_of_the_committed_benchmarks_is_in_plain_gradients():
    """Issue 28 item 5: one unit everywhere, a plain criterion(model(x), y).backward()."""
    results = _committed("bench_summaries.json")
    for section in ("environment", "certificate_environment", "large_environment"):
        assert "plain" in results[section]["unit"], section
    assert all("plain" in block["unit"] for block in results["ratios"].values())
    assert "plain" in results["scaling"]["unit"]
    assert all("plain gradient summarize" in cases for cases in results["memory"].values())
    assert all(case["bounds"]["unit"] == "plain backward" for case in results["large"].values())


def test_readme_cost_paragraph_is_generated_from_the_committed_json():
    """The README quotes the benchmarks' numbers in a block the script writes from the JSON."""
    from analysis import bench_summaries, toolkit

    text = bench_summaries.readme_cost(_committed("bench_summaries.json"))
    assert toolkit.generated_block(text, "cost") in (ROOT / "README.md").read_text()


def test_replace_block_rewrites_only_its_block(tmp_path):
    from analysis import toolkit

    page = tmp_path / "page.md"
    page.write_text("before\n" + toolkit.generated_block("old 1.0×", "cost") + "\nafter\n")
    toolkit.replace_block(page, "cost", "new 2.0×")
    assert (
        page.read_text() == "before\n" + toolkit.generated_block("new 2.0×", "cost") + "\nafter\n"
    )
    page.write_text("no markers\n")
    with pytest.raises(ValueError, match="generated: cost"):
        toolkit.replace_block(page, "cost", "x")


def test_small_models_spectrum_and_monitor_tables_are_generated_from_the_committed_json():
    from analysis import bench_monitor, bench_small_models, bench_spectrum

    _check("small_models.md", bench_small_models.table(_committed("bench_small_models.json")),
           "benchmarks.md")  # fmt: skip
    _check("spectrum.md", bench_spectrum.table(_committed("bench_spectrum.json")), "benchmarks.md")
    _check("monitor.md", bench_monitor.table(_committed("bench_monitor.json")), "benchmarks.md")


def test_loader_table_is_generated_from_the_committed_json():
    from analysis import bench_loader

    _check("loader.md", bench_loader.table(_committed("bench_loader.json")), "benchmarks.md")


def test_sharded_table_is_generated_from_the_committed_json():
    from analysis import bench_sharded

    record = _committed("bench_sharded.json")
    assert {"world2", "world4"} <= set(record)
    _check("sharded.md", bench_sharded.table(record), "benchmarks.md")
    _check("sharded_held.md", bench_sharded.held_table(record), "benchmarks.md")
    # what a rank holds is measured on every FSDP2 run (a section without it would drop its row)
    assert all("summarize_parts" in r["ranks"][0] for k, r in record.items() if k != "environment")

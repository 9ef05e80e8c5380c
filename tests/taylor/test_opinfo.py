"""Taylor mode's op tables against PyTorch's OpInfo database (issue 15, part 3).

Every function in the op table of hos.taylor that OpInfo knows is run on OpInfo's own sample
inputs (float64) with dense random coefficients of orders 1-4 along two lines and the
mixed block of the pair, and compared with nested ``torch.func.jacfwd`` of the op
(tests/helpers/opinfo_rules.py). An op that fails must be fixed or taken out of the tables (so
that it falls back, exactly); a fallback is not a failure. The default run takes the
first usable sample of each op; ``-m slow`` takes six.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("expecttest", reason="OpInfo needs expecttest (the test extra installs it)")

from tests.helpers import opinfo_rules as rules  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

ENTRIES = rules.opinfo_entries()
TABLE = rules.table_functions()
COVERED = sorted(k for k in TABLE if rules.entries_for(k, ENTRIES))

#: Table functions OpInfo has no entry for; their rules are checked in tests/taylor/test_jet.py
#: (against hos.reference) and tests/test_soundness.py (against finite differences).
NOT_IN_OPINFO = {
    "F.fold", "Tensor.type", "Tensor.type_as", "torch.log_sigmoid",
    # the recurrent kernels (rewritten into cells): tests/taylor/test_jet.py and test_real_models.py
    "torch.lstm", "torch.gru", "torch.rnn_tanh", "torch.rnn_relu",
}  # fmt: skip


def test_every_table_function_is_covered_somewhere():
    assert set(TABLE) - set(COVERED) == NOT_IN_OPINFO
    assert len(COVERED) >= 150, f"only {len(COVERED)} table functions matched OpInfo entries"


def test_the_docs_list_the_covered_ops():
    """docs/howto/soundness.md lists exactly the functions this test covers."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs/howto/soundness.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("Covered: "))
    listed = [name.strip(" `.") for name in line.removeprefix("Covered: ").split(",")]
    assert listed == COVERED, "update the Covered: line of docs/howto/soundness.md"


def _check(key: str, samples: int):
    func = TABLE[key]
    gen = torch.Generator().manual_seed(0)
    ran, failures = 0, []
    for op in rules.entries_for(key, ENTRIES):
        if rules.DT not in op.supported_dtypes("cpu"):
            continue
        call = rules.caller(func, op)
        for sample in op.sample_inputs("cpu", rules.DT, requires_grad=False):
            if ran >= samples:
                break
            verdict = rules.check_sample(call, sample, gen)
            if verdict == "skip":
                continue
            ran += 1
            if verdict is not None and not verdict.startswith("fallback"):
                failures.append(f"{sample.summary()}: {verdict}")
    assert ran > 0, f"{key}: no OpInfo sample could be run"
    assert not failures, f"{key}: " + "\n".join(failures)


@pytest.mark.parametrize("key", COVERED)
def test_rule_matches_nested_jvp_on_an_opinfo_sample(key):
    _check(key, samples=1)


@pytest.mark.slow
@pytest.mark.parametrize("key", COVERED)
def test_rule_matches_nested_jvp_on_opinfo_samples(key):
    _check(key, samples=rules.SAMPLES_PER_OP)

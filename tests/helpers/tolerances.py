"""The test suite's tolerances, in one place, and the comparison that uses them.

Every bound is relative to the largest entry of the expected value (plus an absolute
floor), because summaries of different orders differ by orders of magnitude.
"""

from __future__ import annotations

import torch

DT = torch.float64

#: Two exact computations in float64 (backends, the oracle, optimizer algebra).
EXACT = {"rtol": 1e-9, "atol": 1e-11}
#: Problems drawn by hypothesis (random scales, possibly ill-conditioned).
DRAWN = {"rtol": 1e-8, "atol": 1e-10}
#: Richardson finite differences against closed forms and models, per quantity
#: (measured in tests/test_soundness.py): the oracle's own accuracy.
FD = {"g": 1e-8, "H": 1e-6, "d3": 1e-5, "d4": 1e-4}
#: Plain central differences of the reference (tests/backends/test_reference.py).
FD_REFERENCE = {"rtol": 1e-5, "atol": 1e-8}
#: A float32 summary against its float64 oracle.
FLOAT32 = {"rtol": 2e-4, "atol": 2e-4}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected|."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return (actual - expected).abs().max().item() / max(scale, 1e-300)


def assert_close(actual, expected, what: str = "", rtol=None, atol=None) -> None:
    """|actual − expected| <= atol + rtol·max|expected| entrywise (default :data:`EXACT`);
    explain the worst entries."""
    rtol = EXACT["rtol"] if rtol is None else rtol
    atol = EXACT["atol"] if atol is None else atol
    actual = torch.as_tensor(actual, dtype=DT)
    expected = torch.as_tensor(expected, dtype=DT)
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = atol + rtol * scale
    err = (actual - expected).abs()
    if expected.numel() and not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{what}: non-finite entries in {actual}")
    if expected.numel() == 0 or err.max().item() <= bound:
        return
    flat = err.reshape(-1)
    worst = torch.topk(flat, min(5, flat.numel())).indices
    lines = []
    for k in worst.tolist():
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), err.shape))
        lines.append(
            f"  at {idx}: got {actual[idx].item():.12g}, expected {expected[idx].item():.12g}, "
            f"|diff| {err[idx].item():.3g}"
        )
    raise AssertionError(
        f"{what}: max |diff| {err.max().item():.3g} > bound {bound:.3g} "
        f"(rtol {rtol:g} x max|expected| {scale:.3g} + atol {atol:g}); "
        f"{int((err > bound).sum())}/{err.numel()} entries off; worst:\n" + "\n".join(lines)
    )

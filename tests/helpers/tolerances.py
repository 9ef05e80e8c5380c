"""The test suite's tolerances, in one place, and the comparison that uses them.

Every bound is relative to the largest entry of the expected value (plus an absolute
floor), because summaries of different orders differ by orders of magnitude; each
constant says what it bounds and why it has its size. A test file names these constants
and writes no tolerance of its own.
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
#: A float32 summary against its oracle (in float64, or the reference backend in float32).
FLOAT32 = {"rtol": 2e-4, "atol": 1e-6}

# ------------------------------------------------------------ same numbers by other routes
#: Bit for bit: one computation done twice (a resumed optimizer, a group the solver leaves
#: out, an op that ExactOps passes through unchanged).
IDENTICAL = {"rtol": 0.0, "atol": 0.0}
#: One float64 value by the same operations along two routes (a weighted mean by the loader
#: and by hand, model_loss against the plain call, cubic_model against numpy): a few ulps.
SAME_OPS = 1e-14
#: One float64 value by two equal formulas on a small problem (ExactOps' decompositions and
#: hos's attention against PyTorch's kernels, backends on small model code): round-off.
ROUNDOFF = {"rtol": 1e-12, "atol": 1e-12}
#: ROUNDOFF entry by entry, without a floor: the same sums in other groupings (the chunks of a
#: pass, the gradient by torch.func and by .backward()).
ROUNDOFF_ENTRYWISE = {"rtol": 1e-12, "atol": 0.0}
#: EXACT without its absolute floor, for entries far below it (~1e-90 along a direction of
#: scale 1e-30): float64 keeps its relative accuracy at any scale.
EXACT_AT_ANY_SCALE = {"rtol": 1e-9, "atol": 0.0}
#: Exact compositions of AD against each other on model code and long op chains (real models,
#: random chains, the analysis scripts' cross-checks), max|diff| / max|expected|, float64.
AGREE = 1e-10
#: Several gloo processes against one process, float64: only the reduction order differs.
RANKS = {"rtol": 1e-10, "atol": 1e-11}
#: A gradient all-reduced over gloo processes against one process's: one sum of a few terms.
RANKS_GRADIENT = {"rtol": 1e-12, "atol": 1e-11}
#: a summary computed in float32 (FSDP2's mixed precision) against a float32 one computed
#: another way: float32 rounding, summed over a few thousand terms
FLOAT32_RUN = {"rtol": 1e-4, "atol": 1e-6}

# ------------------------------------------------------------ float32 inside
#: Where a float64 model computes in float32 inside (an RMSNorm as Hugging Face writes it), on
#: small model code: backends against each other ("agree"), ḡ against differences ("g").
FLOAT32_ISLAND = {"agree": 1e-5, "g": 1e-4}
#: ... and on real models (tests/test_real_models.py): the backends round differently, and the
#: differences of the float64 loss see float32 rounding (~1e-7 of L / h).
FLOAT32_INSIDE = {"agree": 1e-4, "g": 5e-3}
#: A float32 model's summaries accumulated over a loader against the float64 full-data oracle,
#: relative to max(1, max|expected|) (tests/test_data.py).
FLOAT32_LOADER = 1e-4
#: One float32 loss computed twice at the same weights (in a trainer's callback, and afresh).
FLOAT32_LOSS = 1e-5
#: A float64 scalar written as float32 (TensorBoard's events) and read back: 6e-8 rounding.
FLOAT32_STORED = 1e-6
#: H̄ of a float32 model by other routes (double backward, torch.func) against hos's, relative
#: to its largest entry: float32 rounding of differently ordered sums (measured 5e-7).
FLOAT32_SUMMARY = 1e-5

# ------------------------------------------------------------ finite differences
#: Richardson differences of smooth closed forms (a loss without noise), by order: the
#: oracle's accuracy where nothing but its own truncation and rounding limit it.
FD_CLOSED_FORM = {1: 1e-11, 2: 1e-8, 3: 1e-7, 4: 1e-6}
#: Richardson differences against summaries of small model code (tests/test_model_code.py:
#: attention, routers, compiled and meta-learning losses).
FD_MODEL = {"g": 1e-7, "H": 1e-5, "d3": 1e-3}
#: ... of deep networks (tests/test_real_models.py): float64 losses noisy at ~1e-13, which
#: second and third differences amplify: the oracle is good to ~1e-8 (ḡ), ~1e-5 (H̄), ~1e-4 (d3).
FD_DEEP = {"g": 1e-7, "H": 1e-4, "d3": 1e-3}
#: Taylor-mode op rules against nested jacfwd on OpInfo's samples (tests/helpers/opinfo_rules.py),
#: relative to max(1, max|expected|): float64 samples, and samples of lower precision.
OPINFO = {"float64": 1e-8, "lower": 1e-4}
#: The observed log-log slope of a Taylor model's error against k + 1 (three step sizes: the
#: next term of the truncation error still bends it).
TAYLOR_SLOPE = 0.25

# ------------------------------------------------------------ the cubic solver (float64)
#: m(η*) above the best of many BFGS runs, relative to 1 + |m|: BFGS's own stopping accuracy.
CUBIC_MODEL = 1e-9
#: η* against the BFGS minimiser (BFGS stops at ~1e-6 relative on flat, large cases).
CUBIC_ETA = 1e-5
#: η* against closed forms and the stationarity equation: a few float64 solves.
CUBIC_EXACT = 1e-10
#: The smallest eigenvalue of the certificate H + λ/2 r D² above −this (relative to 1 + its
#: largest entry): an eigensolver's round-off.
CUBIC_PSD = 1e-9
#: The solver's m(η*) and r against their recomputation from η*, and m(η*) <= m(0), relative to
#: the data's scale: round-off of the same formula.
CUBIC_VALUE = 1e-12
#: η* against Newton's step as the damping λ → 0: the gap is O(λ) relative, allowed this·λ.
NEWTON_LIMIT = 100.0
#: Drawn problems (tests/test_properties.py): the stationarity residual and random points
#: below m(η*), relative to the data's scale (possibly ill-conditioned H̄).
SOLVER_DRAWN = 1e-7
#: η* of a drawn problem against η* of its rescaled copy mapped back (scales up to 1e±60), and
#: η* at damping 1e-9 against Newton's step.
SOLVER_ETA = {"rtol": 1e-6, "atol": 1e-9}


#: The Hessian's spectrum (eigenvalues, block traces, the sharpness split) against a dense
#: Hessian from Richardson differences of the ordinary gradient: that oracle's own accuracy
#: (~1e-11 absolute on the test networks), with Lanczos run to machine precision.
SPECTRUM = {"rtol": 1e-8, "atol": 1e-12}
#: The same through a command's JSON or a monitor's log (Lanczos to 1e-6 there, the CLI's
#: numbers printed in full): what the user reads.
SPECTRUM_REPORTED = 1e-6
#: The sharpness gradient and the cubic coefficient against finite differences of the dense
#: λ_max and of the ordinary gradient along v (nested differences lose two more digits).
FD_SPECTRUM = {"rtol": 1e-6, "atol": 1e-8}


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

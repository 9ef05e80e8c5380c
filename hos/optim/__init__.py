"""Optimizers that consume hos summaries: GroupedNewton and SGD-PH."""

from hos.optim._cubic import (
    CubicSolution,
    CubicStatus,
    cubic_model,
    grouped_newton_lrs,
    solve_cubic,
)
from hos.optim._grouped_newton import (
    GroupedNewton,
    GroupedNewtonStep,
    RefreshPhase,
    RefreshRecord,
    cubic_model_step,
    grouped_newton_step,
    plateau_scheduler,
)
from hos.optim._quadratic import damped_quadratic_model, solve_damped_quadratic
from hos.optim._sgdph import SGDPH, CurvatureMode, block_curvature, sgdph_direction

__all__ = [
    # the anisotropic cubic-regularised Newton step (pure functions)
    "CubicSolution",
    "CubicStatus",
    "cubic_model",
    "grouped_newton_lrs",
    "solve_cubic",
    # its ablation with the third-order term off
    "damped_quadratic_model",
    "solve_damped_quadratic",
    # GroupedNewton
    "GroupedNewton",
    "GroupedNewtonStep",
    "RefreshPhase",
    "RefreshRecord",
    "cubic_model_step",
    "grouped_newton_step",  # deprecated name of cubic_model_step
    "plateau_scheduler",
    # SGD with partial Hessian
    "SGDPH",
    "CurvatureMode",
    "block_curvature",
    "sgdph_direction",
]

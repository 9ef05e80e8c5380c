"""hos: higher-order derivative summaries of a loss, per group of parameters."""

from importlib.metadata import PackageNotFoundError, version

from hos._allocator import keep_freed_memory
from hos._data import (
    Reduction,
    summarize_loader,
    summary_diagonal_loader,
    summary_tensor_loader,
)
from hos._density import Density, hessian_density
from hos._directions import gradient_direction, momentum_direction, random_direction
from hos._elements import element_names, split_elements
from hos._errors import (
    LogFormatError,
    ModelMismatchError,
    NonFiniteWarning,
    PrecisionWarning,
    RandomLossError,
    RankFailure,
    SummaryMemoryError,
    TaylorModeWarning,
    UnreadParametersWarning,
)
from hos._exact import ExactOps, exact_ops
from hos._log import SummaryLog, load_log
from hos._loss import ModelLoss, model_loss
from hos._monitor import Snapshot, SummaryMonitor
from hos._outcome import Fallback, last_fallback
from hos._partition import Partition
from hos._progress import progress
from hos._record import load_summary
from hos._sharpness import Sharpness, sharpness, sharpness_gradient
from hos._spectrum import Eigenpairs, Trace, hessian_eigenpairs, hessian_trace
from hos._summary import Backend, Summary, summarize, summary_diagonal, summary_tensor

try:
    __version__ = version("hos")
except PackageNotFoundError:  # pragma: no cover - source tree without install
    __version__ = "0.0.0"

__all__ = [
    # partitions and losses
    "Partition",
    "ModelLoss",
    "model_loss",
    # directions
    "gradient_direction",
    "momentum_direction",
    "random_direction",
    # summaries
    "Backend",
    "Summary",
    "summarize",
    "summary_diagonal",
    "summary_tensor",
    "load_summary",
    # the Hessian's spectrum: sharpness and where it lives
    "hessian_eigenpairs",
    "hessian_trace",
    "hessian_density",
    "sharpness",
    "sharpness_gradient",
    "Eigenpairs",
    "Trace",
    "Density",
    "Sharpness",
    # reliability
    "Fallback",
    "TaylorModeWarning",
    "PrecisionWarning",
    "ModelMismatchError",
    "UnreadParametersWarning",
    "last_fallback",
    "NonFiniteWarning",
    "RandomLossError",
    "SummaryMemoryError",
    # progress bars on long loops
    "progress",
    # speed: glibc keeps freed memory for reuse (process-wide, opt-in)
    "keep_freed_memory",
    # whole data sets and torch.distributed
    "RankFailure",
    "Reduction",
    "summarize_loader",
    "summary_diagonal_loader",
    "summary_tensor_loader",
    # watching a training run
    "SummaryMonitor",
    "Snapshot",
    "SummaryLog",
    "load_log",
    "LogFormatError",
    # exactness
    "ExactOps",
    "exact_ops",
    # per-element groups
    "element_names",
    "split_elements",
]

# subpackage, so that `import hos; hos.optim.GroupedNewton(...)` works (DESIGN.md §4)
from hos import optim  # noqa: E402, F401

r"""Taylor mode: forward passes that carry Taylor coefficients next to every activation.

Two algebras run on one engine (`hos.taylor.engine`) and one op table
(`hos.taylor.ops`):

* `UnivariateTracker` (`hos.taylor.univariate`): coefficients
  $x_k = \tfrac{1}{k!} d^k x/dt^k$ along each group's line $\theta + t u_s$
  (and optionally the mixed second-order ones of every pair) -- the diagonals of
  $D^{(d)}$ and, for small S, the whole GroupedNewton triple from one pass;
* `MultivariateTracker` (`hos.taylor.multivariate`): every coefficient up to
  total degree d of $\eta \mapsto x(\theta + \sum_s \eta_s u_s)$ -- the full
  $D^{(d)}$ for small S.

Where Taylor mode cannot follow a call exactly it raises (or, in the univariate tracker,
keeps) a `TaylorFallback` with the reason, and the backend uses reverse mode.

Layout: `ops` (callable -> kind), `engine` (the steps of one call), `univariate` /
`multivariate` (one rule per kind each), `jets` (univariate coefficient blocks),
`series` (derivatives of elementwise functions), `decompositions` (Taylor-only
rewrites), `inplace` (out-of-place twins of writes), `batching` (ops on
direction-batched operands), `trees` (argument flattening), `fallback`.
"""

from hos.taylor.engine import Tracker, TrackerMode
from hos.taylor.fallback import TaylorFallback, strict
from hos.taylor.jets import Jet
from hos.taylor.multivariate import MultivariateTracker, Poly
from hos.taylor.ops import OPS, Kind, kind_of
from hos.taylor.univariate import UnivariateMode, UnivariateTracker

__all__ = [
    "OPS",
    "Jet",
    "Kind",
    "MultivariateTracker",
    "Poly",
    "TaylorFallback",
    "Tracker",
    "TrackerMode",
    "UnivariateMode",
    "UnivariateTracker",
    "kind_of",
    "strict",
]

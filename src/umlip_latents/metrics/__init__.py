"""Feature-space reconstruction measures between models, equal to scikit-matter's and fast.

GFRE, GFRD and LFRE follow Goscinski, Fraux, Imbalzano and Ceriotti, *The role of feature
space in atomistic learning*, Mach. Learn.: Sci. Technol. 2, 025028 (2021), exactly as
``skmatter.metrics`` (0.4.1) implements them: each feature matrix is centred and scaled to
unit total variance on the training rows (``StandardFlexibleScaler(column_wise=False)``), the
source ``X`` reconstructs the target ``Y`` with ``Ridge2FoldCV(alphas=geomspace(1e-9, 0.9, 20),
alpha_type="relative", regularization_method="cutoff", scoring="neg_root_mean_squared_error",
random_state=0x5F3759DF)`` and the error of a test row is the norm of its residual.

The numbers are skmatter's up to float64 rounding; the speed comes from

- factorising each source once (QR of each CV fold, SVD of the triangular factors, the
  all-rows SVD from the stacked factors) and solving for every target at once: a target only
  adds right-hand-side columns;
- reading the CV error of all cutoffs from one cumulative sum over singular components
  (one alpha per target, chosen like skmatter by the column-mean RMSE over both folds);
- LFRE: one neighbour search for all test rows, then the local 2-fold fits of a batch of test
  rows as batched torch linear algebra, shared by all targets with the same neighbour count.

Inputs may be float32 (stored features); everything is computed in float64 on ``device``
(``"auto"``: a GPU when visible). Beyond the paper: :func:`linear_cka` (Kornblith et al.,
ICML 2019) and :func:`nonlinear_gfre` (kernel ridge) to tell missing information from
non-linearity.
"""


from __future__ import annotations

from ._engine import DEFAULT_ALPHAS, METRICS, RANDOM_STATE, LocalPointsWarning
from .matrix import local_points, percentile_interval, reconstruction_matrix, split_indices
from .pair import (
    pointwise_gfre,
    gfre,
    pointwise_gfrd,
    gfrd,
    pointwise_lfre,
    lfre,
    linear_cka,
    nonlinear_gfre,
)

__all__ = [
    "DEFAULT_ALPHAS", "METRICS", "RANDOM_STATE", "LocalPointsWarning", "local_points", "percentile_interval",
    "reconstruction_matrix",
    "split_indices",
    "pointwise_gfre",
    "gfre",
    "pointwise_gfrd",
    "gfrd",
    "pointwise_lfre",
    "lfre",
    "linear_cka",
    "nonlinear_gfre",
]

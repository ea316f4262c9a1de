"""PCA spectra and effective dimensionality of feature matrices."""

from __future__ import annotations

import numpy as np


def pca_spectrum(values: np.ndarray, standardise: bool = False) -> np.ndarray:
    """Eigenvalues of the covariance of ``values`` (n, D), sorted in decreasing order.

    Computed in float64 from the D x D covariance, so memory stays O(D^2) for any n.
    With ``standardise=True`` the spectrum of the correlation matrix (every column scaled
    to unit variance; constant columns dropped).
    """
    x = np.asarray(values, dtype=np.float64)
    mean = x.mean(axis=0)
    cov = (x.T @ x) / len(x) - np.outer(mean, mean)
    if standardise:
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        keep = std > 1e-12 * max(std.max(), 1e-300)
        cov = cov[np.ix_(keep, keep)] / np.outer(std[keep], std[keep])
    eig = np.linalg.eigvalsh(cov)[::-1]
    return np.clip(eig, 0.0, None)


def effective_dimension(eigenvalues: np.ndarray) -> float:
    """Exponential of the Shannon entropy of the normalised spectrum (Roy & Vetterli 2007).

    Equals D for a flat spectrum and 1 when one component holds all the variance.
    """
    p = np.asarray(eigenvalues, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def components_for_variance(eigenvalues: np.ndarray, fraction: float = 0.99) -> int:
    """Number of leading components that explain ``fraction`` of the variance."""
    c = np.cumsum(eigenvalues) / np.sum(eigenvalues)
    return int(np.searchsorted(c, fraction) + 1)

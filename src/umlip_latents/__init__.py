"""Latent features of universal machine-learning interatomic potentials.

Reference toolkit for arXiv:2512.05717: per-atom latent features of uMLIPs, feature
reconstruction errors between models, fine-tuning bias and cumulant pooling.

Importing the package has no side effects: no folders are created and no model
package is imported until a function needs it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("umlip-latents")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]

"""cvxtune's solvers: two-layer (gated) ReLU heads fitted as convex programs, with certificates.

A pure library: it imports torch and the standard library (plus numpy and safetensors for
input conversion and storage), never the service.
"""

from .estimators import ConvergenceWarning, ConvexMLPClassifier, ConvexMLPRegressor, lam_max
from .io import load

__all__ = ["ConvergenceWarning", "ConvexMLPClassifier", "ConvexMLPRegressor", "lam_max", "load"]

"""cvxtune's solvers: MLP, CNN and attention heads fitted as convex programs, with certificates.

A pure library: it imports torch and the standard library (plus numpy and safetensors for
input conversion and storage), never the service.
"""

from .attention import ConvexAttentionClassifier
from .cnn import ConvexCNNClassifier
from .estimators import ConvergenceWarning, ConvexMLPClassifier, ConvexMLPRegressor, lam_max
from .io import load

__all__ = [
    "ConvergenceWarning",
    "ConvexAttentionClassifier",
    "ConvexCNNClassifier",
    "ConvexMLPClassifier",
    "ConvexMLPRegressor",
    "lam_max",
    "load",
]

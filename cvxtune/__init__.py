"""cvxtune: transfer-learning heads solved as convex programs to a certified optimum.

This package holds what every side shares: the command line and the contracts (task names,
settings, schemas) that both the API (app/) and the workers (workers/) import.
"""

__version__ = "0.1.0"

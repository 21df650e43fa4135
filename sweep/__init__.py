"""sweep: hyperparameter sweeps and experiment tracking for image classification."""

__version__ = "0.1.0"

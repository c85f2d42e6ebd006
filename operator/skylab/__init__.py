"""skylab: autonomous pretraining research, on Kubernetes or on one machine."""

__version__ = "0.1.0"

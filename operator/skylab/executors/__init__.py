"""Executors run trials: locally as a subprocess, or (later) as Kubernetes Jobs.

Both launch the same trainer entrypoint with the same contract.
"""

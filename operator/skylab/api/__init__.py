"""The Kubernetes API of skylab: Campaign and Trial (skylab.dev/v1alpha1)."""

"""Checks of deployment manifests that need no cluster: what `recserve deploy check-k8s` runs (k8s.py)."""

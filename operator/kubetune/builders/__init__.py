"""Pure builders: kubetune objects (and settings) in, trainer configs and Kubernetes manifests out.

No I/O, no Kubernetes client, no kopf (import-linter enforces it), so most of
the operator's logic is tested here without a cluster.
"""

"""kubetune: fine-tune and ship LLM adapters on Kubernetes.

Layers, top to bottom (enforced by import-linter): ``cli`` -> ``controllers``
-> ``builders`` -> ``api``. ``api`` and ``builders`` are pure.
"""

__version__ = "0.1.0"

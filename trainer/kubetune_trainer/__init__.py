"""kubetune_trainer: the workload of a kubetune training pod.

Never imports ``kubetune`` (the operator): the trainer image carries torch,
the operator image does not, and only the light modules (``config``,
``storage``) are shared, in this direction.
"""

__version__ = "0.1.0"

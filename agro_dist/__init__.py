"""agro_dist: distributed RL fine-tuning of language models with AGRO on Ray.

The algorithm core (``agro_dist.losses``, ``agro_dist.tabular``) is pure PyTorch: no I/O,
no models, no Ray.
"""

__version__ = "0.1.0"

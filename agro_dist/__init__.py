"""agro_dist: distributed RL fine-tuning of language models with AGRO on Ray.

The algorithm core (``agro_dist.core.losses``, ``agro_dist.tabular``) is pure PyTorch: no I/O,
no models, no Ray.
"""

import os as _os

__version__ = "0.1.0"

# In a source tree (a clone, or a Ray job's uploaded working directory) buffer/, learner/ and
# actors/ sit next to agro_dist/ and are its subpackages (pyproject.toml's package-dir). Adding
# the tree's root to the search path makes `agro_dist.buffer` resolve to the same tree as
# `agro_dist` even where the installed copy is elsewhere or is not editable.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.exists(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(_os.path.join(_root, "buffer")):
    __path__.append(_root)  # noqa: F821 (a package's __path__)

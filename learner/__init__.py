"""The learner (installed as ``agro_dist.learner``): a DeepSpeed engine applying AGRO losses to
groups from the replay buffer, publishing weights and writing checkpoints. See docs/learner.md.

The names below load on first use: ``agro_dist.learner.actor`` and ``.config`` (what the driver
needs) do not import torch, DeepSpeed or transformers."""

from .config import PACKINGS, LearnerConfig

__all__ = ["GuardedAdamW", "Learner", "LearnerConfig", "PACKINGS", "lr_at", "step_from_buffer"]


def __getattr__(name):
    if name in ("GuardedAdamW", "Learner", "lr_at"):
        from . import learner

        return getattr(learner, name)
    if name == "step_from_buffer":
        from .loop import step_from_buffer

        return step_from_buffer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

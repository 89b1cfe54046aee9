"""The learner (installed as ``agro_dist.learner``): a DeepSpeed engine applying AGRO losses to
groups from the replay buffer, publishing weights and writing checkpoints. See docs/learner.md."""

from .learner import GuardedAdamW, Learner, LearnerConfig, lr_at
from .loop import step_from_buffer

__all__ = ["GuardedAdamW", "Learner", "LearnerConfig", "lr_at", "step_from_buffer"]

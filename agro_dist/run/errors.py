"""The errors a run stops with, and Ray's "this actor is gone" errors in one tuple."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot continue (a learner that keeps failing, no data arriving); exit status 4."""


def ray_actor_errors() -> tuple:
    """Ray's errors for an actor that is gone (its process or its node): to rebuild or restart it."""
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ActorUnavailableError) if hasattr(rex, "ActorUnavailableError") else (rex.RayActorError,)

"""A fault injected by tests/test_system.py into a Ray job's processes (PYTHONPATH=tests/faults).

With ``AGRO_TEST_KILL_UPLOAD=step_00000004``, the process that uploads that checkpoint (the
learner rank) SIGKILLs itself after its third file reached the storage: a job killed half-way
through a checkpoint, at a moment a test can count on. Every other process is unaffected.
"""

import os

_target = os.environ.get("AGRO_TEST_KILL_UPLOAD")
if _target:
    import signal

    import pyarrow.fs as _pafs

    _real, _sent = _pafs.copy_files, [0]

    def _copy_then_die(source, destination, *args, **kwargs):
        _real(source, destination, *args, **kwargs)
        if f"/{_target}/" in destination:
            _sent[0] += 1
            if _sent[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    _pafs.copy_files = _copy_then_die


# With ``AGRO_TEST_KILL_LEARNER=train_step:4,publish:3,checkpoint:2`` (and a folder for markers in
# ``AGRO_TEST_KILL_DIR``), a learner process SIGKILLs itself at its n-th call of that kind: in the
# middle of a step (its batch sampled, not acked), while publishing weights to the generators,
# and with a checkpoint written but not yet renamed into place. Each fault fires once per run
# (its marker file), so the learner rebuilt after it runs on. Given to the actors through
# ``--run.env_vars`` (with ``PYTHONPATH`` naming this folder).
_learner_faults = os.environ.get("AGRO_TEST_KILL_LEARNER")
if _learner_faults:
    import functools
    import importlib.abc
    import importlib.machinery
    import signal
    import sys

    _at = {k: int(v) for k, v in (x.split(":") for x in _learner_faults.split(","))}
    _calls: dict = {}

    def _maybe_die(kind):
        _calls[kind] = _calls.get(kind, 0) + 1
        if _calls[kind] != _at.get(kind):
            return
        try:
            fd = os.open(os.path.join(os.environ["AGRO_TEST_KILL_DIR"], kind), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # fired already in this run
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    def _before(fn, kind):
        @functools.wraps(fn)
        def wrapped(*a, **kw):
            _maybe_die(kind)
            return fn(*a, **kw)
        return wrapped

    def _after(fn, kind):
        @functools.wraps(fn)
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            _maybe_die(kind)
            return out
        return wrapped

    def _patch(module):
        if module.__name__ == "agro_dist.learner.learner":
            module.Learner.train_step = _before(module.Learner.train_step, "train_step")
            module._fsync_tree = _after(module._fsync_tree, "checkpoint")  # written and synced, not renamed
        elif module.__name__ == "agro_dist.learner.actor":
            module.LearnerWorker.publish = _before(module.LearnerWorker.publish, "publish")

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        """Patches the learner's modules as they are imported (the actor imports them late)."""

        def find_spec(self, name, path, target=None):
            if name not in ("agro_dist.learner.learner", "agro_dist.learner.actor"):
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return None
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())

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

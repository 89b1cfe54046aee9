"""The README's Python example runs as written (in a subprocess, as a user would paste it)."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README has no python example"
    for code in blocks:  # in a folder of their own: the learner's example writes a 2 GB checkpoint under runs/
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        if "get_loss" in code:
            assert "reward_mean" in out.stdout
        if "ReplayBuffer(replay_prob" in code:
            assert "('fresh', 1)" in out.stdout and "('replay', 1)" in out.stdout
        if "Generator(" in code:
            assert "greedy_accuracy" in out.stdout
        if "step_from_buffer" in code:
            assert "'version': 1.0" in out.stdout and "step_00000001" in out.stdout

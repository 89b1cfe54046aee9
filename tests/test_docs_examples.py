"""The Python examples of the docs run as written (in a subprocess, as a user would paste them):
the API examples of docs/losses.md, docs/buffer.md, docs/learner.md and docs/generator.md (the
README's recipes are commands: tests/test_user_paths.py runs them on the default model)."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["docs/losses.md", "docs/buffer.md", "docs/learner.md", "docs/generator.md"]


def examples(page: str):
    """The page's runnable Python blocks (a signature sketch without imports is not one)."""
    return [b for b in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S) if re.search(r"^(import|from) ", b, re.M)]


@pytest.mark.parametrize("page", PAGES)
def test_the_docs_python_examples_run(tmp_path, page):
    blocks = examples(page)
    assert blocks, f"{page} has no runnable Python example"
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


def test_the_readme_links_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"`((?:docs|deploy)/[\w./-]+\.md)`", readme))
    assert {"docs/architecture.md", "docs/training.md", "docs/outputs.md", "docs/offline.md", "docs/config.md"} <= linked
    assert not [p for p in linked if not (ROOT / p).exists()]
    assert len(readme.encode()) < 13_000, "the README is the front door: details go to docs/"

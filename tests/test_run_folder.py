"""agro_dist/run/run_folder.py: a run's folder is made ready, and only agro_dist's own is ever deleted."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from agro_dist.run import config
from agro_dist.run.run_folder import RUN_MARKER, RunFolder
from agro_dist.run.startup import StartupError


def _cfg(tmp_path, **kw):
    return config.load(overrides={"run.output_dir": str(tmp_path), "run.name": "r", **kw}, check=False)


def test_open_writes_the_marker_the_config_and_the_log_and_close_lets_the_log_go(tmp_path):
    f = RunFolder(_cfg(tmp_path))
    f.open()
    try:
        logging.getLogger("agro_dist").warning("a line for the run's log")
        assert json.loads((tmp_path / "r" / RUN_MARKER).read_text())["run"] == "r"
        assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["run"]["name"] == "r"
        assert f.sync() and f.latest_hf() == "(no checkpoint)"  # local: written in place, nothing to upload
    finally:
        f.close()
    assert "a line for the run's log" in (tmp_path / "r" / "driver.log").read_text()
    assert f.log_file not in logging.getLogger().handlers
    assert (tmp_path / "r").is_dir()  # a local run's folder stays


def test_overwrite_deletes_only_a_folder_agro_dist_made_for_that_run(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("a user's file")
    with pytest.raises(StartupError, match="not a run folder"):
        RunFolder(_cfg(tmp_path, **{"run.overwrite": True})).open()
    assert (tmp_path / "r" / "mine.txt").exists()
    (tmp_path / "r" / RUN_MARKER).write_text(json.dumps({"run": "r"}))
    f = RunFolder(_cfg(tmp_path, **{"run.overwrite": True}))
    f.open()
    f.close()
    assert not (tmp_path / "r" / "mine.txt").exists() and (tmp_path / "r" / "config.yaml").exists()


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(StartupError, match="no checkpoint"):
        RunFolder(_cfg(tmp_path, **{"run.resume": True})).open()

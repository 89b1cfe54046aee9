"""A run's folder: ``run.storage_path/run.name`` (or ``run.output_dir/run.name``), local or on
remote storage, and what may be done to it.

A new run never lands on an earlier one (``check_run_home``): a folder that holds anything is
refused unless ``run.resume`` continues it or ``run.overwrite`` deletes it, and only a folder
agro_dist made for that run is ever deleted (its marker, ``is_run_folder``). For remote storage
the run writes into a local work folder whose files are uploaded at each checkpoint and at the end
(``sync``; the learner uploads its checkpoints itself) and downloaded to resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Optional

import yaml

from agro_dist.io.storage import Storage, display, is_remote, join, latest_checkpoint
from agro_dist.run.config import Config, ConfigError
from agro_dist.run.startup import StartupError

log = logging.getLogger("agro_dist")

# Written into every run folder at start: what run.overwrite needs to see before it deletes a folder.
RUN_MARKER = ".agro_dist_run"
# A run's files besides its checkpoints: uploaded to remote storage, downloaded to resume.
RUN_FILES = ("config.yaml", "driver.log", "train.csv", "eval.csv", "samples.jsonl", "summary.json", "training.png", "tensorboard", "redis",
             "wandb", "wandb_run_id", "mlruns", "mlflow_run_id", RUN_MARKER)


class RunFolder:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.home = cfg.run_home  # a local folder or a URI
        self.remote = is_remote(self.home)
        self.run_dir = tempfile.mkdtemp(prefix=f"agro_dist-{cfg.run.name}-") if self.remote else self.home
        self.ckpt_dir = join(self.home, "checkpoints")
        self.log_file: Optional[logging.Handler] = None

    def open(self) -> None:
        """The folder made ready: an earlier run deleted where ``run.overwrite`` says so, the marker,
        a resumed remote run's files downloaded, the driver's log (tracebacks included; the console
        gets one line per failure) and the run's config.yaml."""
        cfg, home = self.cfg, Storage(self.home)
        resume = cfg.run.resume
        if resume and latest_checkpoint(self.ckpt_dir) is None:
            raise StartupError(f"run.resume: no checkpoint in {display(self.ckpt_dir)}")
        if not resume and cfg.run.overwrite and home.exists():
            if not is_run_folder(home, cfg.run.name):  # checked before start too (check_run_home); never delete a stranger's folder
                raise StartupError(f"run.overwrite: {display(self.home)} is not a run folder of {cfg.run.name!r}: not deleted")
            log.warning("deleting the previous run in %s (run.overwrite)", display(self.home))
            home.delete("")
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, RUN_MARKER), "w") as f:
            json.dump({"run": cfg.run.name, "home": display(self.home), "made_by": "agro_dist"}, f)
        if self.remote and resume:  # the run's logs and tables (and the private Redis's files) continue where the storage has them
            home.download("", self.run_dir, names=list(RUN_FILES))
        self.log_file = logging.FileHandler(os.path.join(self.run_dir, "driver.log"))
        self.log_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logging.getLogger().addHandler(self.log_file)
        with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    def sync(self) -> bool:
        """Remote storage: upload the run's tables, plots, logs, config and Redis files (the
        checkpoints are uploaded by the learner); True once they are there. Local runs write in
        place: nothing to do."""
        if not self.remote:
            return True
        if self.log_file is not None:
            self.log_file.flush()
        try:
            # Not redis.conf: it holds the server's password when it has one (it is rewritten at every start).
            Storage(self.home).upload(self.run_dir, "", names=list(RUN_FILES), skip=("redis/redis.conf",))
            return True
        except OSError as e:
            log.warning("could not upload the run's files to %s: %s (they stay in %s)", display(self.home), e, self.run_dir)
            return False

    def close(self) -> None:
        """The final upload (tables, plots, summary, the log's last lines: a failure's traceback,
        Redis's files), the log closed; a remote run's local work folder removed once its files
        are in run.storage_path (Redis's AOF can be large)."""
        uploaded = self.remote and self.log_file is not None and self.sync()
        if self.log_file is not None:
            logging.getLogger().removeHandler(self.log_file)
            self.log_file.close()
        if uploaded:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def latest_hf(self) -> str:
        """The Hugging Face folder of the newest checkpoint (``latest`` holds its name)."""
        try:
            name = latest_checkpoint(self.ckpt_dir)
            if name is None:
                return "(no checkpoint)"
            return display(join(self.ckpt_dir, name, "hf"))
        except OSError:
            return "(no checkpoint)"


def check_run_home(cfg: Config) -> None:
    """Before anything starts: a new run never lands on an earlier one. A run folder that holds
    anything is refused (ConfigError: exit 2) unless ``run.resume`` continues it or
    ``run.overwrite`` deletes it; the storage must be reachable (OSError: exit 3)."""
    if cfg.run.resume:
        return
    home = Storage(cfg.run_home)
    if cfg.run.overwrite:
        if home.exists() and not is_run_folder(home, cfg.run.name):
            raise ConfigError(f"run.overwrite: {display(cfg.run_home)} is not a run folder agro_dist made for run {cfg.run.name!r} "
                              f"(no {RUN_MARKER} marker of that run, no config.yaml with run.name {cfg.run.name}): refusing to "
                              "delete it. Choose another --run.name or --run.output_dir / --run.storage_path")
        return
    if home.files(""):
        latest = latest_checkpoint(join(cfg.run_home, "checkpoints"))
        raise ConfigError(f"run.name {cfg.run.name!r}: {display(cfg.run_home)} already holds a run"
                          f"{f' (latest checkpoint {latest})' if latest else ''}: continue it with --run.resume true, "
                          f"choose another --run.name, or delete it with --run.overwrite true")


def is_run_folder(home: Storage, name: str) -> bool:
    """Whether ``home`` is a folder agro_dist made for run ``name``: its marker says so, or (runs
    made before the marker) its config.yaml has that run.name. What run.overwrite may delete."""
    try:
        if home.exists(RUN_MARKER):
            return json.loads(home.read_text(RUN_MARKER)).get("run") == name
        if home.exists("config.yaml"):
            saved = yaml.safe_load(home.read_text("config.yaml"))
            return isinstance(saved, dict) and isinstance(saved.get("run"), dict) and saved["run"].get("name") == name
    except (ValueError, yaml.YAMLError, OSError):
        return False
    return False

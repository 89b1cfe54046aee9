"""Experiment trackers beside train.csv: Weights & Biases and MLflow (``run.loggers``).

Each is an optional extra (``pip install -e ".[wandb]"`` / ``".[mlflow]"``) configured the way
its users already do, with its own environment variables; the driver alone logs (one run per
training run, named ``run.name``):

- ``wandb``: ``WANDB_PROJECT`` (default ``agro_dist``), ``WANDB_ENTITY``, ``WANDB_MODE``
  (``offline`` writes under the run folder's ``wandb/``, to upload later with ``wandb sync``),
  ``WANDB_DIR`` (default: the run folder). Train and eval series each have their own step
  (``train/step``, ``eval/step``), so an evaluation collected after a later training step is kept.
- ``mlflow``: ``MLFLOW_TRACKING_URI`` (default: a file store in the run folder, ``mlruns/``),
  ``MLFLOW_EXPERIMENT_NAME`` (default ``agro_dist``).

Both get the resolved config as parameters, every train.csv and eval.csv value under ``train/``
and ``eval/``, and the sampled completions of every evaluation (a table in W&B, a JSON artifact
``samples/step_<N>.json`` in MLflow). A tracker that fails mid-run is logged once and switched
off: it never stops training.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from typing import Any, Dict, List, Optional, Sequence

log = logging.getLogger("agro_dist")

LOGGERS = ("tensorboard", "wandb", "mlflow")
_EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # name -> (module, pip extra)


def check_loggers(names: Sequence[str]) -> None:
    """ValueError naming an unknown logger, or one whose package is not installed."""
    import importlib.util

    for n in names:
        if n not in LOGGERS:
            raise ValueError(f"unknown logger {n!r}: use {', '.join(LOGGERS)}")
        if n in _EXTRAS and importlib.util.find_spec(_EXTRAS[n][0]) is None:
            raise ValueError(f"logger {n} needs the {_EXTRAS[n][0]} package: pip install -e \".[{_EXTRAS[n][1]}]\" "
                             f"(or pip install {'mlflow-skinny' if n == 'mlflow' else n})")
        if n == "mlflow":
            why = _mlflow_unreachable()
            if why:
                raise ValueError(f"logger mlflow: {why} (MLFLOW_TRACKING_URI); unset it for a file store in the run folder")
        if n == "wandb" and not _wandb_can_log():
            raise ValueError("logger wandb: not logged in to W&B (no WANDB_API_KEY, no netrc entry): run `wandb login`, or set "
                             "WANDB_MODE=offline to keep the run in the run folder and `wandb sync` it later")


def _mlflow_unreachable(timeout_s: float = 5.0) -> Optional[str]:
    """Why an http(s) MLFLOW_TRACKING_URI cannot be reached, or None (MLflow's client would retry
    a dead server for minutes, mid-start)."""
    from agro_dist.io.models import endpoint_unreachable

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        return None
    why = endpoint_unreachable(uri, timeout_s)
    return f"the tracking server {why}" if why else None


def _wandb_can_log() -> bool:
    """Whether wandb.init will not stop for a login: offline or disabled, or a key it can find."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _numbers(row: Dict[str, Any], kind: str) -> Dict[str, float]:
    return {f"{kind}/{k}": float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class WandbTracker:
    def __init__(self, run_dir: str, run_name: str, config: Dict[str, Any], resume: bool):
        import wandb

        self.wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync hints would drown the progress line
        # A resumed run continues the same W&B run: its id is kept in the run folder.
        id_file = os.path.join(run_dir, "wandb_run_id")
        run_id = open(id_file).read().strip() if resume and os.path.exists(id_file) else secrets.token_hex(4)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "agro_dist"), name=run_name, id=run_id, resume="allow",
                              dir=os.environ.get("WANDB_DIR", run_dir), config=config, reinit="create_new")
        with open(id_file, "w") as f:
            f.write(run_id)
        for kind in ("train", "eval"):
            self.run.define_metric(f"{kind}/step")
            self.run.define_metric(f"{kind}/*", step_metric=f"{kind}/step")
        self.where = f"W&B run {self.run.id} ({self.run.settings.mode}, {self.run.dir})"

    def log(self, kind: str, row: Dict[str, Any]) -> None:
        self.run.log(_numbers(row, kind))

    def samples(self, step: int, rows: List[Dict[str, Any]]) -> None:
        cols = ["step", "version", "prompt", "completion", "reward", "answer"]
        table = self.wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        self.run.log({"eval/step": step, "eval/samples": table})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: str, run_name: str, config: Dict[str, Any], resume: bool):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A file store in the run folder: MLflow 3 keeps it in maintenance mode and asks for
            # this opt-in; a database or server is one MLFLOW_TRACKING_URI away.
            uri = "file:" + os.path.join(os.path.abspath(run_dir), "mlruns")
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "agro_dist")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        id_file = os.path.join(run_dir, "mlflow_run_id")
        if resume and os.path.exists(id_file):
            self.run_id = open(id_file).read().strip()
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            params = {k: str(v)[:500] for k, v in _flat(config).items()}
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
            with open(id_file, "w") as f:
                f.write(self.run_id)
        self.where = f"MLflow run {self.run_id} at {uri}"

    def log(self, kind: str, row: Dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        step, now = int(row.get("step", 0)), int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in _numbers(row, kind).items()])

    def samples(self, step: int, rows: List[Dict[str, Any]]) -> None:
        self.client.log_dict(self.run_id, rows, f"samples/step_{step:08d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers; each call goes to every one still working."""

    def __init__(self, names: Sequence[str], run_dir: str, run_name: str, config: Dict[str, Any], *, resume: bool = False):
        self.active: Dict[str, Any] = {}
        for n in names:
            if n in TRACKERS:
                t = TRACKERS[n](run_dir, run_name, config, resume)
                log.info("logging to %s", t.where)
                self.active[n] = t

    def _each(self, what: str, *args) -> None:
        for n, t in list(self.active.items()):
            try:
                getattr(t, what)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop training
                log.warning("logger %s failed (%s: %s); it is off for the rest of the run", n, type(e).__name__, e)
                self.active.pop(n, None)

    def log(self, kind: str, row: Dict[str, Any]) -> None:
        self._each("log", kind, row)

    def samples(self, step: int, rows: List[Dict[str, Any]]) -> None:
        if rows:
            self._each("samples", step, rows)

    def close(self) -> None:
        self._each("close")
        self.active = {}


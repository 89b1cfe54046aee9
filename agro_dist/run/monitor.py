"""Run monitoring: Ray dashboard metrics, CSV, TensorBoard, the progress line, end-of-run plots.

Every learner step and every evaluation becomes one row: ``train.csv`` / ``eval.csv`` in the
run folder (the source of truth; the plots are drawn from them), TensorBoard scalars under
``run_dir/tensorboard``, and ``ray.util.metrics`` gauges so the Ray dashboard's metrics view
(and the Prometheus endpoint behind it, names prefixed ``ray_``) shows the run live.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence

log = logging.getLogger("agro_dist")

# Columns of train.csv, in order. Missing values are written empty.
TRAIN_COLUMNS = [
    "step", "version", "samples", "elapsed_s", "epoch",
    # samples = fresh_samples + replayed_samples (completions trained); generated_samples and
    # generated_tokens: what the generators made (the cost of the data), cumulative.
    "fresh_samples", "replayed_samples", "generated_samples", "generated_tokens", "replayed_groups", "replay_unavailable",
    "reward_mean", "kl", "log_ratio", "reg_reward_mean", "loss", "entropy", "grad_norm", "lr",
    "response_len_mean", "behaviour_drift", "fresh_staleness_mean", "fresh_staleness_max", "replay_age_mean", "replay_age_max",
    "replay_fraction", "skipped", "buffer_backlog", "buffer_history", "buffer_full_s", "buffer_evicted_full",
    "stale_skipped", "generated_groups", "generated_tokens_per_s", "trained_tokens_per_s", "step_s", "wait_s",
    "weight_sync_s", "generator_restarts", "learner_restarts", "reward_timeouts", "reward_errors",
    # Where a step's time went (sync mode: the parts take turns): generation and reward scoring
    # (seconds since the last row, summed over generators), the learner's reference pass, policy
    # forward+backward and optimizer (within step_s).
    "generate_s", "reward_s", "ref_s", "policy_s", "optimizer_s",
]
# elapsed_s: the run's clock at its step's end where the evaluation runs between steps (sync runs on CPU, an eval
# actor sharing the cores), when it was collected where it runs beside training; eval_s: the evaluation's own time.
EVAL_COLUMNS = ["step", "version", "samples", "generated_samples", "elapsed_s", "greedy_accuracy", "sampled_accuracy", "eval_problems",
                "eval_s"]
STALENESS_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5]  # histogram buckets: 0, 1, 2, 3, 4, 5-8, 9-16, more

# Gauges on the Ray dashboard: name -> (column, description).
GAUGES = {
    "agro_reward_mean": ("reward_mean", "mean reward of the groups in the last learner batch"),
    "agro_kl": ("kl", "KL(pi || pi_ref) per sequence on the last batch: exact over the vocabulary at each response position, summed"),
    "agro_log_ratio": ("log_ratio", "mean sequence log pi(y)/pi_ref(y) of the last batch (a KL estimate only on-policy)"),
    "agro_loss": ("loss", "loss of the last batch: the consistency loss 1/2 Var(R) for agro_off/agro_on/rloo, else the surrogate"),
    "agro_replay_fraction": ("replay_fraction", "fraction of the last batch replayed from the history"),
    "agro_staleness_mean": ("fresh_staleness_mean", "mean staleness (versions behind) of the last batch's fresh groups (<= max_staleness)"),
    "agro_replay_age_mean": ("replay_age_mean", "mean age (versions behind) of the last batch's replayed groups"),
    "agro_buffer_backlog": ("buffer_backlog", "fresh groups waiting in the replay buffer"),
    "agro_buffer_full_seconds": ("buffer_full_s", "seconds generators were held back by a full buffer so far (backpressure)"),
    "agro_generated_tokens_per_s": ("generated_tokens_per_s", "completion tokens generated per second (all generators)"),
    "agro_trained_tokens_per_s": ("trained_tokens_per_s", "response tokens trained per second"),
    "agro_weight_sync_seconds": ("weight_sync_s", "seconds to publish and load the last weights on the generators"),
    "agro_policy_version": ("version", "learner version (optimizer steps applied)"),
    "agro_samples": ("samples", "completions trained so far (fresh and replayed)"),
    "agro_replayed_samples": ("replayed_samples", "completions trained so far that were replayed from the history"),
    "agro_generated_samples": ("generated_samples", "completions generated so far (the cost of the data)"),
    "agro_generator_restarts": ("generator_restarts", "generator actor restarts so far"),
}
REWARD_FN_GAUGE = "each reward function's mean value (before weighting) over the completions generated since the last step"
EVAL_GAUGES = {
    "agro_eval_sampled_accuracy": ("sampled_accuracy", "held-out accuracy, sampled at the training temperature"),
    "agro_eval_greedy_accuracy": ("greedy_accuracy", "held-out accuracy, greedy"),
}


def grafana_dashboard() -> Dict:
    """A Grafana dashboard (JSON model) with a panel for every metric the driver exports, on Ray's
    Prometheus datasource, filtered by a ``run`` variable: ``deploy/grafana/agro_dist.json`` is
    this (``python -m agro_dist.run.monitor grafana``; a test keeps them equal)."""
    series = [(f"ray_{n}", d) for n, (_, d) in {**GAUGES, **EVAL_GAUGES}.items()]
    panels = []
    for i, (metric, desc) in enumerate(series):
        panels.append(dict(type="timeseries", title=metric.removeprefix("ray_agro_"), description=desc, id=i + 1,
                           datasource={"type": "prometheus", "uid": "${datasource}"},
                           gridPos=dict(h=8, w=8, x=8 * (i % 3), y=8 * (i // 3)),
                           targets=[dict(expr=f'{metric}{{run=~"$run"}}', legendFormat="{{run}}", refId="A")]))
    n = len(series)
    extra = [("ray_agro_reward_fn_mean", REWARD_FN_GAUGE, 'ray_agro_reward_fn_mean{run=~"$run"}', "{{run}} {{fn}}"),
             ("ray_agro_staleness", "fresh groups trained, by staleness (versions behind; histogram buckets)",
              'sum by (le) (increase(ray_agro_staleness_bucket{run=~"$run"}[5m]))', "<= {{le}}")]
    for j, (metric, desc, expr, legend) in enumerate(extra):
        i = n + j
        panels.append(dict(type="timeseries", title=metric.removeprefix("ray_agro_"), description=desc, id=i + 1,
                           datasource={"type": "prometheus", "uid": "${datasource}"},
                           gridPos=dict(h=8, w=8, x=8 * (i % 3), y=8 * (i // 3)),
                           targets=[dict(expr=expr, legendFormat=legend, refId="A")]))
    return dict(
        title="agro_dist", uid="agro-dist", schemaVersion=39, version=1, refresh="10s", time={"from": "now-1h", "to": "now"},
        tags=["ray", "agro_dist"], panels=panels,
        templating={"list": [
            dict(name="datasource", type="datasource", query="prometheus", current={}, hide=0),
            dict(name="run", type="query", datasource={"type": "prometheus", "uid": "${datasource}"}, includeAll=True, multi=True,
                 query={"query": "label_values(ray_agro_policy_version, run)", "refId": "run"}, refresh=2,
                 current={"text": "All", "value": "$__all"}),
        ]})


class RunMonitor:
    """One per driver. ``train(row)`` / ``eval(row)`` record a step / an evaluation everywhere."""

    def __init__(self, run_dir: str, run_name: str, *, resume: bool = False, tensorboard: bool = True, ray_metrics: bool = True,
                 reward_names: Sequence[str] = (), loggers: Sequence[str] = (), config: Optional[Dict] = None):
        """``reward_names``: the reward functions of ``generator.reward_fn`` when it is a list;
        train.csv gains a ``reward_<name>`` column for each, and the gauge ``agro_reward_fn_mean``
        a series per function (tag ``fn``). ``loggers``: ``run.loggers`` (W&B, MLflow: the
        ``trackers`` module), given ``config`` as their parameters."""
        self.run_dir = run_dir
        self.reward_names = list(reward_names)
        mode = "a" if resume else "w"
        self._files, self._writers = {}, {}
        train_cols = TRAIN_COLUMNS + [f"reward_{n}" for n in self.reward_names]
        for name, cols in (("train", train_cols), ("eval", EVAL_COLUMNS)):
            path = os.path.join(run_dir, f"{name}.csv")
            fresh = mode == "w" or not os.path.exists(path) or os.path.getsize(path) == 0
            if not fresh:  # a resumed run appends under the file's own header
                with open(path, newline="") as f:
                    cols = next(csv.reader(f), cols)
            f = open(path, mode, newline="")
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", restval="")
            if fresh:
                w.writeheader()
            self._files[name], self._writers[name] = f, w
        from agro_dist.run.trackers import Trackers

        self.trackers = Trackers(loggers, run_dir, run_name, config or {}, resume=resume)
        self._samples = open(os.path.join(run_dir, "samples.jsonl"), mode)
        self.tb = None
        if tensorboard:
            try:
                self.tb = ScalarWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError as e:  # tensorboard is a dependency; a broken install should not stop training
                log.warning("TensorBoard logging off: %s", e)
        self.gauges: Dict[str, tuple] = {}
        self.reward_fn_gauge = None
        self.staleness_hist = None
        if ray_metrics:
            from ray.util import metrics

            tags = {"run": run_name}
            for name, (col, desc) in {**GAUGES, **EVAL_GAUGES}.items():
                g = metrics.Gauge(name, description=desc, tag_keys=("run",))
                g.set_default_tags(tags)
                self.gauges[name] = (col, g)
            self.staleness_hist = metrics.Histogram("agro_staleness", description="staleness (versions) of each trained fresh group",
                                                    boundaries=STALENESS_BOUNDARIES, tag_keys=("run",))
            self.staleness_hist.set_default_tags(tags)
            if self.reward_names:
                self.reward_fn_gauge = metrics.Gauge("agro_reward_fn_mean", description=REWARD_FN_GAUGE, tag_keys=("run", "fn"))
                self.reward_fn_gauge.set_default_tags(tags)

    def _record(self, kind: str, row: Dict[str, float], gauges: Dict[str, tuple]) -> None:
        self._writers[kind].writerow({k: _fmt(v) for k, v in row.items()})
        self._files[kind].flush()
        step = int(row.get("step", 0))
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()
        self.trackers.log(kind, row)
        for name, (col, g) in self.gauges.items():
            if name in gauges and isinstance(row.get(col), (int, float)) and math.isfinite(row[col]):
                g.set(float(row[col]))

    def train(self, row: Dict[str, float], staleness_counts: Optional[Dict[int, int]] = None) -> None:
        self._record("train", row, GAUGES)
        for n in self.reward_names:
            v = row.get(f"reward_{n}")
            if self.reward_fn_gauge is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.reward_fn_gauge.set(float(v), tags={"fn": n})
        if self.staleness_hist is not None and staleness_counts:
            for s, c in staleness_counts.items():
                for _ in range(int(c)):
                    self.staleness_hist.observe(float(s))

    def eval(self, row: Dict[str, float]) -> None:
        self._record("eval", row, EVAL_GAUGES)

    def samples(self, step: int, rows: List[Dict]) -> None:
        """An evaluation's sampled completions (prompt, completion, reward, answer): a line each in
        ``samples.jsonl``, a table in the trackers, a text summary in TensorBoard."""
        rows = [dict(step=step, **r) for r in rows]
        for r in rows:
            self._samples.write(json.dumps(r) + "\n")
        self._samples.flush()
        if self.tb is not None and rows:
            text = "\n\n".join(f"**reward {r['reward']:g}** (answer {r['answer']})\n\n    {r['prompt']}\n    -> {r['completion']}"
                                for r in rows)
            self.tb.add_text("eval/samples", text, step)
            self.tb.flush()
        self.trackers.samples(step, rows)

    def close(self) -> None:
        self.trackers.close()
        self._samples.close()
        for f in self._files.values():
            f.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: str) -> List[Dict[str, float]]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: float(v) for k, v in r.items() if v not in ("", None)})
    return rows


class ScalarWriter:
    """TensorBoard scalars written with the ``tensorboard`` package's own event writer: the same
    files as ``torch.utils.tensorboard.SummaryWriter`` (which wraps it), without importing torch
    into the driver (~0.3 GB resident, measured)."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self._writer = EventFileWriter(logdir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=float(value))])
        self._writer.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def add_text(self, tag: str, text: str, step: int) -> None:
        """A text summary (TensorBoard's Text tab; markdown), as ``SummaryWriter.add_text`` writes it."""
        from tensorboard.compat.proto.summary_pb2 import SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

        meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
        tensor = TensorProto(dtype=7, string_val=[text.encode()],  # 7: DT_STRING
                             tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
        summary = self._summary(value=[self._summary.Value(tag=tag, metadata=meta, tensor=tensor)])
        self._writer.add_event(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def progress_line(row: Dict[str, float], *, steps: int, last_eval: Optional[Dict[str, float]], eta_s: Optional[float]) -> str:
    def g(k, fmt="{:.3f}"):
        v = row.get(k)
        return "-" if v is None else fmt.format(v)

    age = row.get("replay_age_mean")
    replay_age = "" if age is None else f" (age {age:.1f})"
    ev = "-" if not last_eval else f"{100 * last_eval['sampled_accuracy']:.1f}% (v{int(last_eval['version'])})"
    total = f"/{steps}" if steps else ""
    eta = "" if eta_s is None else f", ~{_dur(eta_s)} left"
    epoch = "" if row.get("epoch") is None else f" | epoch {row['epoch']:.2f}"
    replayed = f" ({int(row['replayed_samples'])} replayed)" if row.get("replayed_samples") else ""
    made = "" if epoch or row.get("generated_samples") is None else f" | generated {int(row['generated_samples'])}"
    head = (f"step {int(row['step'])}{total}{epoch} | v{int(row['version'])} | samples {int(row['samples'])}{replayed}{made} | "
            f"reward {g('reward_mean')} | kl {g('kl')} | eval {ev} | ")
    # Generated data: how fresh it is, the replay, the buffer, the generators (offline has none of these).
    full = f" (full: gen held {row['buffer_full_s']:.0f}s)" if row.get("buffer_full_s") else ""
    gen = "" if epoch else (f"fresh stale {g('fresh_staleness_mean', '{:.2f}')} | replay {g('replay_fraction', '{:.2f}')}{replay_age} | "
                            f"backlog {g('buffer_backlog', '{:.0f}')}{full} | gen {g('generated_tokens_per_s', '{:.0f}')} tok/s | ")
    sync = "" if epoch else f" | sync {g('weight_sync_s', '{:.2f}')}s"
    return f"{head}{gen}train {g('trained_tokens_per_s', '{:.0f}')} tok/s{sync} | {_dur(row['elapsed_s'])}{eta}"


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s"


def run_config(run_dir: str) -> Optional[Dict[str, Any]]:
    """A run folder's ``config.yaml`` as plain data (None where it is missing or unreadable)."""
    try:
        import yaml

        with open(os.path.join(run_dir, "config.yaml")) as f:
            return yaml.safe_load(f) or {}
    except (OSError, ValueError, ImportError):
        return None


def _run_title(run_dir: str) -> str:
    """The figure's title: the run's name, then model, task, loss, beta, mode and p from its config.yaml."""
    name = os.path.basename(os.path.abspath(run_dir))
    c = run_config(run_dir)
    if c is None:
        return name
    run, gen, lrn = c.get("run") or {}, c.get("generator") or {}, c.get("learner") or {}
    model = os.path.basename(str(c.get("model", "?")).rstrip("/"))
    task = str(gen.get("task", "?")) + (f" {gen['task_options']}" if gen.get("task_options") else "")
    lora = f", LoRA {lrn['lora_rank']}" if lrn.get("lora_rank") else ""
    return (f"{name}: {model} on {task} | {lrn.get('loss', '?')}, beta {lrn.get('beta', '?')}{lora} | "
            f"{run.get('mode', '?')} mode, p {run.get('replay_prob', 0)}")


def run_panels(train_rows: List[Dict]) -> List[str]:
    """The panels ``plot_run`` draws for these train.csv rows: staleness only where something was
    stale or replayed, throughput only where it was measured."""
    def nonzero(*keys):
        return any(r.get(k) for r in train_rows for k in keys)

    names = ["reward", "reward_minutes", "kl", "reward_vs_kl"]
    if nonzero("fresh_staleness_mean", "fresh_staleness_max", "replay_age_mean", "replay_fraction"):
        names.append("staleness")
    if nonzero("generated_tokens_per_s", "trained_tokens_per_s"):
        names.append("throughput")
    return names


def plot_run(run_dir: str, out: Optional[str] = None) -> str:
    """``training.png``: reward and held-out accuracy vs completions and vs minutes, KL, reward vs
    KL, staleness and replay (only where there is some: a sync run at p = 0 has none), throughput.
    Drawn from the run folder's CSVs (so it can be redrawn for any run); titled with the run's
    model, task, loss, beta, mode and p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = read_csv(os.path.join(run_dir, "train.csv"))
    ev = read_csv(os.path.join(run_dir, "eval.csv"))
    out = out or os.path.join(run_dir, "training.png")

    def col(rows, k):
        xs = [r for r in rows if k in r]
        return xs, [r[k] for r in xs]

    # Against what the data cost (completions generated) where generators ran, else what was trained (offline).
    xs0 = ("generated_samples", "completions generated") if any(r.get("generated_samples") for r in tr) else ("samples", "completions trained")

    def reward_panel(a, xk, xlabel, scale):
        rows, ys = col(tr, "reward_mean")
        a.plot([r[xk] * scale for r in rows], ys, ".", alpha=0.35, color="C0", label="batch reward")
        if ys:
            w = max(1, len(ys) // 10)
            sm = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
            a.plot([r[xk] * scale for r in rows], sm, "-", color="C0", label=f"batch reward (mean of {w})")
        for k, c in (("sampled_accuracy", "C1"), ("greedy_accuracy", "C2")):
            rows_e = [r for r in col(ev, k)[0] if r.get(xk) is not None]  # a resumed run's first evaluation has no count
            a.plot([r[xk] * scale for r in rows_e], [r[k] for r in rows_e], "o-", color=c, label=f"held-out {k.split('_')[0]} accuracy")
        a.set_xlabel(xlabel)
        a.set_ylabel("reward / accuracy")
        a.set_ylim(-0.02, 1.02)
        a.set_title(f"reward and held-out accuracy vs {xlabel}")
        a.legend(fontsize=8)

    def kl_panel(a):
        rows, ys = col(tr, "kl")
        a.plot([r["step"] for r in rows], ys, "-", color="C3", label="exact (vocabulary) KL")
        rows_lr, ys_lr = col(tr, "log_ratio")
        a.plot([r["step"] for r in rows_lr], ys_lr, ":", color="C3", alpha=0.6, label="sampled log pi/pi_ref (on-policy estimate)")
        a.set_xlabel("learner step")
        a.set_ylabel("nats per sequence")
        a.set_title("KL(pi || pi_ref) per sequence")
        a.legend(fontsize=8)

    def scatter_panel(a):
        rows, ys = col(tr, "kl")
        sc = a.scatter(ys, [r.get("reward_mean", float("nan")) for r in rows], c=[r["step"] for r in rows], cmap="viridis", s=12)
        fig.colorbar(sc, ax=a, label="learner step")
        a.set_xlabel("KL(pi || pi_ref) per sequence (nats)")
        a.set_ylabel("batch reward")
        a.set_title("reward vs KL")

    def staleness_panel(a):
        for k, c, style in (("fresh_staleness_mean", "C4", "-"), ("fresh_staleness_max", "C5", "-"), ("replay_age_mean", "C9", ":")):
            rows, ys = col(tr, k)
            a.plot([r["step"] for r in rows], ys, style, color=c, label=k.replace("_", " ") + " (versions)")
        rows, ys = col(tr, "replay_fraction")
        a.plot([r["step"] for r in rows], ys, "--", color="C6", label="replay fraction")
        a.set_xlabel("learner step")
        a.set_ylabel("versions behind / fraction")
        a.set_title("staleness of fresh and replayed groups; replay fraction")
        a.legend(fontsize=8)

    def throughput_panel(a):
        for k, c in (("generated_tokens_per_s", "C7"), ("trained_tokens_per_s", "C8")):
            rows, ys = col(tr, k)
            a.plot([r["step"] for r in rows], ys, "-", color=c, label=k.replace("_", " "))
        a.set_xlabel("learner step")
        a.set_ylabel("tokens/s")
        a.set_title("throughput")
        a.legend(fontsize=8)

    draw = dict(reward=lambda a: reward_panel(a, *xs0, 1.0), reward_minutes=lambda a: reward_panel(a, "elapsed_s", "minutes", 1 / 60),
                kl=kl_panel, reward_vs_kl=scatter_panel, staleness=staleness_panel, throughput=throughput_panel)
    panels = [draw[name] for name in run_panels(tr)]
    ncol = 3
    nrow = (len(panels) + ncol - 1) // ncol
    fig, ax = plt.subplots(nrow, ncol, figsize=(15, 4 * nrow), squeeze=False)
    for a, draw in zip(ax.flat, panels):
        draw(a)
        a.grid(alpha=0.3)
    for a in list(ax.flat)[len(panels):]:
        a.set_visible(False)
    fig.suptitle(_run_title(run_dir), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["grafana"]:
        sys.exit("usage: python -m agro_dist.run.monitor grafana > deploy/grafana/agro_dist.json")
    print(json.dumps(grafana_dashboard(), indent=1))

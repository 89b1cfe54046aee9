"""The run configuration: one YAML file, command-line overrides, defaults; plain data.

Keys are ``section.key`` (``learner.lr``, ``run.replay_prob``) plus the top-level ``model``.
Precedence: command line > ``--config`` file > the defaults below. ``python -m agro_dist
--help`` lists every key with its default and meaning (taken from ``HELP``); ``docs/config.md``
is generated from the same (``markdown_table``), and a test keeps it equal.

The ``generator`` and ``learner`` sections are ``GeneratorConfig`` and ``LearnerConfig``
themselves (minus the fields the driver sets: model, seed, generator id), so a key added there
appears here with no second list to keep in step.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from agro_dist.actors.generator import GeneratorConfig
from agro_dist.learner.config import PACKINGS, LearnerConfig


@dataclass
class RunConfig:
    name: str = "agro"
    output_dir: str = "runs"
    storage_path: Optional[str] = None
    overwrite: bool = False
    seed: int = 0
    mode: str = "sync"
    steps: int = 40
    epochs: float = 0.0
    max_samples: int = 0
    max_generated: int = 0
    max_minutes: float = 0.0
    sync_every: int = 1
    replay_prob: float = 0.0  # or "auto"
    replay_max: float = 0.5
    max_staleness: Optional[int] = 2
    max_backlog_groups: int = 0
    eval_every: int = 10
    eval_size: int = 0
    eval_samples: int = 8
    eval_task: Optional[str] = None
    eval_task_path: Optional[str] = None
    eval_task_options: Optional[Dict[str, Any]] = None
    eval_engine: str = "auto"
    checkpoint_every: int = 0
    resume: bool = False
    ray_address: Optional[str] = None
    env_vars: Dict[str, Any] = field(default_factory=dict)
    connect_timeout_s: float = 30.0
    startup_timeout_s: float = 600.0
    learner_restarts: int = 2
    step_timeout_s: float = 900.0
    tensorboard: bool = True
    loggers: List[str] = field(default_factory=list)
    plots: bool = True


@dataclass
class DataSection:
    path: Optional[str] = None
    shuffle: bool = True


@dataclass
class BufferSection:
    redis_url: Optional[str] = None
    redis_port: int = 0
    appendfsync: str = "everysec"
    redis_maxmemory_gb: float = 0.0
    history_max_groups: int = 10000
    history_max_bytes: int = 1 << 30
    replay_window: int = 4
    replay_weighting: str = "uniform"
    replay_max_uses: int = 0
    claim_idle_s: float = 300.0


@dataclass
class ResourcesSection:
    num_generators: int = 1
    learner_ranks: int = 1
    generator_cpus: float = 1.0
    generator_gpus: float = 0.0
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    eval_cpus: float = 0.0
    eval_gpus: float = 0.0
    generator_memory_gb: float = 2.8
    learner_memory_gb: float = 5.1
    eval_memory_gb: float = 3.0
    threads: int = 0
    object_store_gb: float = 0.0
    generator_max_restarts: int = -1
    generator_resources: Dict[str, float] = field(default_factory=dict)
    learner_resources: Dict[str, float] = field(default_factory=dict)
    eval_resources: Dict[str, float] = field(default_factory=dict)
    learner_placement: str = "PACK"


# Driver-owned fields of the component configs: not user keys.
_HIDDEN = {"generator": {"model", "seed", "generator_id"}, "learner": {"model", "seed"}}

# The driver's defaults for the component configs where they differ from the classes' own:
# the measured recipe for SmolLM2-135M on 1-digit addition (issue 6's feasibility run).
# No task_options default: they belong to one task (arithmetic's levels default to [1] in the task
# itself); a default here leaked into every other task ("unexpected keyword argument 'levels'").
_GENERATOR_DEFAULTS = dict(n=4, temperature=0.7, max_tokens=12, prompts_per_call=8)
_LEARNER_DEFAULTS = dict(lr=1e-5, beta=0.05, batch_groups=8, micro_groups=4, grad_clip=1.0)

SECTIONS = {"run": RunConfig, "generator": GeneratorConfig, "learner": LearnerConfig, "data": DataSection, "buffer": BufferSection,
            "resources": ResourcesSection}

HELP: Dict[str, str] = {
    "model": "Hugging Face model folder (or a hub id, org/name, where the hub is reachable) for the policy, the reference and the "
             "generators; 'default' = SmolLM2-135M-Instruct (embedded)",
    # run
    "run.name": "run name ([A-Za-z0-9][A-Za-z0-9._-]*, at most 128): outputs go to output_dir/name; also names the Ray actors "
                "and the buffer",
    "run.output_dir": "parent folder of run folders (local runs without run.storage_path)",
    "run.storage_path": "where runs are kept, each in storage_path/name: a local or shared folder, or a URI pyarrow.fs opens "
                        "(s3://bucket/prefix, gs://..., hdfs://...); null = run.output_dir, except under `ray job submit` with a "
                        "relative output_dir: ~/agro_dist_results on the driver's node",
    "run.overwrite": "delete an existing run of the same name (checkpoints included) and start afresh; without it such a run is "
                     "refused. Only a folder agro_dist made for a run of this name is deleted (its .agro_dist_run marker, or "
                     "config.yaml with this run.name); any other folder is refused, exit 2",
    "run.seed": "seed of the learner, the generators (seed + index) and the buffer's replay draws",
    "run.mode": "sync: generators make each step's fresh groups with the current weights and load every new version (on-policy at "
                "p = 0; the paper's replay at p > 0); async: generators run ahead, bounded by max_staleness; "
                "frozen: generators keep the initial weights (pi_ref), staleness grows; offline: train from data.path, no generators",
    "run.steps": "learner steps (optimizer updates) to run; 0 = no step limit",
    "run.epochs": "offline: passes over data.path (the first budget reached stops the run; set run.steps 0 for epochs only); 0 = no limit",
    "run.max_samples": "stop after this many trained completions (fresh and replayed); 0 = no limit",
    "run.max_generated": "stop once the generators have made this many completions (the cost of the data: compare replay "
                         "ratios at equal generation); 0 = no limit",
    "run.max_minutes": "stop after this many minutes of training; 0 = no limit",
    "run.sync_every": "publish weights to the generators every k learner steps (1 in sync mode)",
    "run.replay_prob": "p, the replay ratio: this fraction of every batch is groups replayed from the history of trained groups, "
                       "the rest fresh, exactly (round((k+1)pB) - round(kpB) at step k); the generators make only the fresh part "
                       "(sync and async). auto (async): replay fills the part of a batch whose fresh groups are not ready, up to "
                       "run.replay_max, so the learner never waits for generation",
    "run.replay_max": "run.replay_prob auto: the most of a batch replay may fill",
    "run.max_staleness": "fresh groups older than this many versions are skipped (counted, deleted: never trained, never "
                         "replayed); null = keep all",
    "run.max_backlog_groups": "async: generators pause while this many fresh groups wait in the buffer; 0 = one step's fresh "
                              "groups (ceil((1 - p) x batch_groups); batch_groups with replay_prob auto)",
    "run.eval_every": "held-out evaluation every this many steps (and before the first and after the last); 0 = only before/after",
    "run.eval_size": "held-out problems per evaluation; 0 = the task's whole held-out set",
    "run.eval_samples": "samples per held-out problem for the sampled accuracy (temperature = generator.temperature)",
    "run.eval_task": "task of the held-out evaluation (e.g. math500); null = the training task's held-out split",
    "run.eval_task_path": "data file or folder of run.eval_task; null = generator.task_path when the task is the same",
    "run.eval_task_options": "task arguments of run.eval_task; null = generator.task_options when the task is the same, else {}",
    "run.eval_engine": "who evaluates: generator (generator 0, between its training calls: no second vLLM engine, ~2.5 GB less for the "
                       "default run), separate (an eval actor with its own engine and resources.eval_*: evaluations never delay "
                       "generation, for clusters with room), auto = generator in sync and async runs, separate in frozen and offline "
                       "runs (their generators keep pi_ref, or there are none)",
    "run.checkpoint_every": "checkpoint every this many steps (and at the end); 0 = only at the end",
    "run.resume": "resume from the run folder's latest checkpoint (learner, version, counters)",
    "run.ray_address": "Ray cluster to join; default: RAY_ADDRESS, else start a private local Ray",
    "run.env_vars": "environment variables for every actor (Ray's runtime_env env_vars), e.g. {HF_HOME: /data/hf}; kept in "
                    "config.yaml, so no secrets (give those to the cluster's or the job's environment)",
    "run.connect_timeout_s": "a peer that does not answer within this many seconds stops start-up with exit 3: the Ray cluster, Redis at redis_url, the learner's rendezvous",
    "run.startup_timeout_s": "actors (generators, learner ranks, eval) not ready within this many seconds (pending resources, a hanging model load) stop start-up with exit 3",
    "run.learner_restarts": "times a failed learner group is rebuilt from its latest checkpoint before the run fails",
    "run.step_timeout_s": "a learner step (including waiting for data) longer than this fails the run",
    "run.tensorboard": "write TensorBoard event files to the run folder",
    "run.loggers": "experiment trackers beside train.csv: [wandb, mlflow] (each an optional extra; set up with their own "
                   "environment variables: WANDB_MODE=offline, MLFLOW_TRACKING_URI; tensorboard also accepted)",
    "run.plots": "write training.png (reward, accuracy, KL, staleness) at the end",
    # data
    "data.path": "run.mode offline: a file of logged generations (JSONL or Parquet; format in docs/offline.md)",
    "data.shuffle": "offline: shuffle the groups every epoch (seeded by run.seed); false = file order",
    # buffer
    "buffer.redis_url": "use this Redis (redis://host:port/db); default: start a private one on 127.0.0.1 (never port 6379)",
    "buffer.redis_port": "port of the private Redis; 0 = a free port",
    "buffer.appendfsync": "private Redis durability: everysec or always",
    "buffer.redis_maxmemory_gb": "memory limit of the private Redis; 0 = a quarter of the node's memory. Full, it evicts the oldest "
                                 "history, then holds the generators back until the learner trains (buffer_full_s)",
    "buffer.history_max_groups": "replay history capacity in groups (oldest evicted)",
    "buffer.history_max_bytes": "replay history capacity in bytes",
    "buffer.replay_window": "replay only groups at most this many policy versions older than the learner (older ones are evicted); "
                            "0 = the whole history (frozen runs: always the whole history)",
    "buffer.replay_weighting": "uniform, or recency: a group's chance grows linearly with its place in the window, oldest to newest",
    "buffer.replay_max_uses": "a group replayed this many times leaves the history; 0 = no cap",
    "buffer.claim_idle_s": "groups pending this long on a dead learner are re-delivered to another",
    # resources
    "resources.num_generators": "G: vLLM generator actors",
    "resources.learner_ranks": "N: DeepSpeed ranks of the learner, one Ray actor each",
    "resources.generator_cpus": "CPUs per generator actor (Ray resource request)",
    "resources.generator_gpus": "GPUs per generator actor",
    "resources.learner_cpus": "CPUs per learner rank",
    "resources.learner_gpus": "GPUs per learner rank",
    "resources.eval_cpus": "CPUs for the eval actor (0: it shares, it runs only between steps)",
    "resources.eval_gpus": "GPUs for the eval actor",
    "resources.generator_memory_gb": "memory per generator actor (Ray resource request, checked against the cluster's before start: "
                                     "exit 3 saying what is missing); default: the default run's measured peak, 2.7 GB (docs/system.md)",
    "resources.learner_memory_gb": "memory per learner rank; default: the default run's measured peak, 5.05 GB",
    "resources.eval_memory_gb": "memory for the eval actor (run.eval_engine separate, frozen and offline runs)",
    "resources.threads": "threads per actor (OMP_NUM_THREADS); 0 = the driver node's core count (the parts take turns in sync mode)",
    "resources.generator_max_restarts": "Ray max_restarts of generator actors (-1 = always restart)",
    "resources.generator_resources": "custom Ray resources per generator actor, e.g. {gen_node: 1} (nodes started with ray start --resources)",
    "resources.learner_resources": "custom Ray resources per learner rank (each rank's placement-group bundle)",
    "resources.eval_resources": "custom Ray resources for the eval actor",
    "resources.object_store_gb": "object store of a private local Ray (GB); 0 = auto: 2.5 x the policy's weights in the "
                                 "learner's dtype, at least 0.5 GB (1.35 GB for SmolLM2-135M in float32); Ray's own default is 30 percent of "
                                 "free memory, taken from what actors may request. A cluster's is set by `ray start --object-store-memory`",
    "resources.learner_placement": "placement strategy of the learner ranks' group: PACK (fewest nodes), SPREAD, STRICT_PACK or STRICT_SPREAD (one rank per node)",
    # generator
    "generator.task": "arithmetic, math, math500, gsm8k, jsonl, or dataset (your prompts: JSONL/Parquet/CSV files, a folder, "
                      "a saved or hub dataset; docs/data.md)",
    "generator.task_path": "data file, folder or hub dataset name for math/math500/gsm8k/jsonl/dataset",
    "generator.task_options": "task arguments, e.g. {levels: [1, 2]} (arithmetic; default levels [1]); dataset: prompt_key, answer_key, "
                              "eval_path, ...; any task: system_prompt, chat_template, raw_prompt, instruction",
    "generator.reward_fn": "reward: numeric, math, pkg.module:function (agro_dist's, TRL's batched or verl's signature), or a list "
                           "of them / {fn, weight, name} summed with weights (docs/rewards.md); default: the task's",
    "generator.reward_timeout_s": "a reward call longer than this scores 0 and is counted",
    "generator.n": "completions per prompt (a group)",
    "generator.temperature": "sampling temperature (training and sampled evaluation)",
    "generator.top_p": "nucleus sampling",
    "generator.max_tokens": "maximum completion tokens",
    "generator.stop": "stop strings",
    "generator.prompts_per_call": "prompts per vLLM call (groups per put into the buffer)",
    "generator.max_model_len": "vLLM context length",
    "generator.dtype": "auto: float32 on CPU, bfloat16 on GPU",
    "generator.kv_cache_gb": "vLLM CPU backend KV cache (GB), resident for the engine's life; 0 = auto: room for two training calls "
                             "(2 x n x prompts_per_call sequences of the longest prompt + max_tokens), at least one max_model_len "
                             "sequence (0.38 GB for the default run); bigger batches (evaluations) run in waves",
    "generator.vllm": "extra vllm.LLM arguments, e.g. {gpu_memory_utilization: 0.5}",
    # learner
    "learner.ref_model": "reference model folder; default: the policy's initial weights",
    "learner.loss": "agro_off (any data), agro_on or rloo (samples of the current policy only: run.mode sync, run.replay_prob 0, "
                    "generator.top_p 1; refused otherwise), kl_pg, grpo, agro_single or dpo",
    "learner.loss_options": "loss arguments, e.g. {kl_estimator: causal} (on-policy only), agro_on's {lr_baseline: none | loo | loo_var}",
    "learner.beta": "KL regularisation strength",
    "learner.temperature": "the learner scores the policy and the reference as softmax(logits / T): the distribution the "
                           "generators sample (KL, log-ratio, entropy are of these tempered policies); null = generator.temperature "
                           "(1 if that is 0). agro_on and rloo need it equal to generator.temperature",
    "learner.batch_groups": "groups (prompts) per optimizer step, over all ranks",
    "learner.micro_groups": "groups per forward/backward on one rank",
    "learner.micro_tokens": "> 0: micro-batches by tokens instead (padding included, whole groups); ZeRO 0-2",
    "learner.lr": "AdamW learning rate",
    "learner.weight_decay": "AdamW weight decay",
    "learner.adam_betas": "AdamW betas",
    "learner.adam_eps": "AdamW epsilon",
    "learner.grad_clip": "gradient norm clip; 0 = off",
    "learner.lr_schedule": "constant or cosine",
    "learner.warmup_steps": "linear warm-up steps",
    "learner.total_steps": "cosine schedule length",
    "learner.min_lr_ratio": "cosine floor as a fraction of lr",
    "learner.zero_stage": "DeepSpeed ZeRO stage 0-3",
    "learner.offload_optimizer": "ZeRO-Offload of the optimizer to CPU",
    "learner.dtype": "float32 or bfloat16 (GPU)",
    "learner.logprob_chunk": "positions per chunk of vocabulary logits (memory)",
    "learner.pad_to_multiple_of": "pad sequence lengths to a multiple of this",
    "learner.pack": "prefix (default): each prompt computed once and its keys/values shared by its completions (2x faster "
                    "per step and ~1 GB less for the default run); rows: each group once in rows under a 4-D mask; none: one "
                    "padded row per completion (the prompt n times)",
    "learner.pack_tokens": "pack rows only: tokens per packed row",
    "learner.ref_cache_groups": "reference log-probs cached for this many groups (replay needs no second pass)",
    "learner.gradient_checkpointing": "recompute activations in backward (memory)",
    "learner.value_lr": "agro_single only: AdamW learning rate of the value head V(x) (a linear map of the detached prompt state)",
    "learner.lora_rank": "LoRA adapters (peft) of this rank instead of full fine-tuning (0: off); the reference is then the base model "
                         "with the adapters off (no second copy); ZeRO 0-2",
    "learner.lora_alpha": "LoRA scale alpha (the update is alpha / rank x B A); 0 = 2 x lora_rank",
    "learner.lora_dropout": "dropout on the LoRA path",
    "learner.lora_targets": "module names to adapt, e.g. [q_proj, v_proj]; [] = every linear layer but the output head (peft's all-linear)",
    "learner.exact_kl": "report kl = exact KL(pi, pi_ref) over the vocabulary at each response position (right off-policy too); costs a reference pass for replayed groups",
    "learner.deepspeed": "DeepSpeed config merged over the generated one",
}


@dataclass
class Config:
    model: str = "default"
    run: RunConfig = field(default_factory=RunConfig)
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(**_GENERATOR_DEFAULTS))
    learner: LearnerConfig = field(default_factory=lambda: LearnerConfig(model="default", **_LEARNER_DEFAULTS))
    data: DataSection = field(default_factory=DataSection)
    buffer: BufferSection = field(default_factory=BufferSection)
    resources: ResourcesSection = field(default_factory=ResourcesSection)

    @property
    def run_home(self) -> str:
        """Where this run is kept: ``storage_path/name`` (a local path or a URI), else ``output_dir/name``."""
        from agro_dist.io.storage import is_remote, join, local_path

        if self.run.storage_path:
            home = join(self.run.storage_path, self.run.name)
            return home if is_remote(home) else local_path(home)
        return local_path(os.path.join(self.run.output_dir, self.run.name))

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"model": self.model}
        for sec in SECTIONS:
            d = dataclasses.asdict(getattr(self, sec))
            out[sec] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k not in _HIDDEN.get(sec, ())}
        return out

    @property
    def replay_auto(self) -> bool:
        return self.run.replay_prob == "auto"

    @property
    def fixed_replay_prob(self) -> float:
        """The fixed replay ratio p (0 under ``auto``, whose ratio is decided step by step)."""
        return 0.0 if self.replay_auto else float(self.run.replay_prob)

    def fresh_per_step(self) -> int:
        """The most fresh groups one learner step takes: ceil((1 - p) B) (B under ``auto``)."""
        B = self.learner.batch_groups
        return B - math.floor(self.fixed_replay_prob * B)

    def generator_config(self, index: int) -> Dict[str, Any]:
        d = dataclasses.asdict(self.generator)
        d.update(model=self.model, seed=self.run.seed + index, generator_id=f"gen-{index}")
        return d

    def eval_on_generator(self) -> bool:
        """Whether generator 0 evaluates (``run.eval_engine``) instead of an eval actor."""
        return self.run.eval_engine == "generator" or (self.run.eval_engine == "auto" and self.run.mode in ("sync", "async"))

    def eval_takes_turns(self) -> bool:
        """Whether the eval actor runs only between the learner's steps: it has no resources of
        its own (``resources.eval_cpus`` and ``eval_gpus`` 0), so it shares the learner's."""
        return not self.resources.eval_cpus and not self.resources.eval_gpus

    def eval_task_spec(self) -> Optional[Dict[str, Any]]:
        """The evaluation task for ``Generator.evaluate(task=...)``: None when it is the training task."""
        e, g = self.eval_generator_config(), self.generator_config(0)
        keys = ("task", "task_path", "task_options", "reward_fn")
        return None if all(e[k] == g[k] for k in keys) else {k: e[k] for k in keys}

    def eval_generator_config(self) -> Dict[str, Any]:
        """The eval actor's configuration: generator 0's, with the evaluation task."""
        d = self.generator_config(0)
        d["generator_id"] = "eval"
        r, g = self.run, self.generator
        if r.eval_task:
            same = r.eval_task == g.task
            d["task"] = r.eval_task
            d["task_path"] = r.eval_task_path if r.eval_task_path is not None else (g.task_path if same else None)
            d["task_options"] = r.eval_task_options if r.eval_task_options is not None else (dict(g.task_options) if same else {})
            d["reward_fn"] = g.reward_fn if same else None  # another task is scored by its own reward
        return d

    @property
    def learner_temperature(self) -> float:
        """The temperature the learner scores at: ``learner.temperature``, else the generators'
        (1 when they sample greedily, which has no tempered distribution)."""
        if self.learner.temperature is not None:
            return float(self.learner.temperature)
        return float(self.generator.temperature) if self.generator.temperature > 0 else 1.0

    def learner_config(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self.learner)
        d.update(model=self.model, seed=self.run.seed, temperature=self.learner_temperature)
        return d


class ConfigError(ValueError):
    pass


def keys() -> List[Tuple[str, Any]]:
    """Every user key with its default, in display order."""
    d = Config().to_dict()
    out = [("model", d["model"])]
    for sec in SECTIONS:
        out += [(f"{sec}.{k}", v) for k, v in d[sec].items()]
    return out


def _set(cfg: Config, key: str, value: Any, where: str) -> None:
    if key == "model":
        cfg.model = str(value)
        return
    sec, _, name = key.partition(".")
    if sec not in SECTIONS or not name:
        raise ConfigError(f"{where}: unknown key {key!r} (python -m agro_dist --help lists every key)")
    obj = getattr(cfg, sec)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields or name in _HIDDEN.get(sec, ()):
        raise ConfigError(f"{where}: unknown key {key!r} (python -m agro_dist --help lists every key)")
    setattr(obj, name, _coerce(getattr(obj, name), value, key, where))


def _coerce(default: Any, value: Any, key: str, where: str) -> Any:
    """Check a value against the default's type (None defaults take anything)."""
    if default is None or value is None:
        return value
    if key == "run.replay_prob" and value == "auto":
        return value
    if key == "run.loggers" and isinstance(value, str):  # --run.loggers wandb, as TRL's report_to takes one name
        return [value]
    t = type(default)
    if t in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 3e-5 (no dot) as a string
            value = t(value)
        except ValueError:
            pass
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif t is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif t is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    elif t in (list, dict, str) and isinstance(value, t):
        return value
    raise ConfigError(f"{where}: {key} must be {t.__name__} (like {default!r}), got {value!r}")


def _flatten(d: Dict[str, Any], where: str) -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: section {k!r} must be a mapping, got {v!r}")
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _read(path: str) -> Dict[str, Any]:
    """A config file's keys, flattened (``{"learner.lr": 1e-5}``)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    return _parse(text, path)


def _parse(text: str, path: str) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return _flatten(data, path)


def load(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None, *, check: bool = True) -> Config:
    """Defaults, then the YAML file, then ``overrides`` (``{"learner.lr": 1e-5}``); validated
    unless ``check`` is false."""
    cfg = Config()
    if path:
        for k, v in _read(path).items():
            _set(cfg, k, v, path)
    for k, v in (overrides or {}).items():
        _set(cfg, k, v, "command line")
    if check:
        validate(cfg)
    return cfg


# Settings a resumed run keeps from its saved config.yaml: its checkpoint was made with them (the
# weights' shapes, DeepSpeed's optimizer partitioning, the ranks' files, the value head). Given with
# another value on resume they are refused; every other key may change (steps, lr, eval, data, ...).
RESUME_FIXED = ("model", "learner.ref_model", "learner.loss", "learner.temperature", "learner.zero_stage", "learner.offload_optimizer",
                "learner.dtype", "resources.learner_ranks", "learner.lora_rank", "learner.lora_alpha", "learner.lora_targets")


def _get(cfg: Config, key: str) -> Any:
    if key == "model":
        return cfg.model
    sec, _, name = key.partition(".")
    return getattr(getattr(cfg, sec), name)


def resume_config(cfg: Config, given: Dict[str, Any]) -> Config:
    """For ``run.resume``: the run's saved ``config.yaml`` with the keys the user ``given`` now
    (config file and command line) on top; a ``RESUME_FIXED`` key given with a value other than
    the saved one is a ConfigError naming both. Without a saved config, ``cfg`` as it is."""
    from agro_dist.io.storage import Storage, display, join

    home = Storage(cfg.run_home)
    saved_path = display(join(cfg.run_home, "config.yaml"))
    if not home.exists("config.yaml"):
        return cfg
    saved_keys = _parse(home.read_text("config.yaml"), saved_path)
    saved = Config()
    for k, v in saved_keys.items():
        _set(saved, k, v, saved_path)
    clash = [f"{k}={_get(cfg, k)!r} (saved: {_get(saved, k)!r})" for k in RESUME_FIXED if k in given and _get(cfg, k) != _get(saved, k)]
    if clash:
        raise ConfigError(f"run.resume: {', '.join(clash)}: not as in the run's {saved_path}; a resumed run keeps the settings "
                          f"its checkpoint was made with: drop these options, or start a new run.name")
    out = Config()
    for k, v in saved_keys.items():
        _set(out, k, v, saved_path)
    for k, v in given.items():
        _set(out, k, v, "command line")
    return out


# A run name is a folder under run.output_dir (or storage_path), the prefix of the Ray actors'
# names and of the buffer's Redis keys: one path component, never "." or "..", no glob characters.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate(cfg: Config) -> None:
    r, res, lc = cfg.run, cfg.resources, cfg.learner
    if not isinstance(r.name, str) or not RUN_NAME.fullmatch(r.name):
        raise ConfigError(f"run.name {r.name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit, at most "
                          "128 characters (it names the run's folder under run.output_dir or run.storage_path, its Ray actors "
                          "and its buffer keys)")
    if r.mode not in ("sync", "async", "frozen", "offline"):
        raise ConfigError(f"run.mode must be sync, async, frozen or offline, got {r.mode!r}")
    if (r.mode == "offline") != bool(cfg.data.path):
        raise ConfigError("run.mode=offline trains from data.path: give both (--run.mode offline --data.path FILE)" if r.mode == "offline"
                          else f"data.path is read in run.mode=offline only (run.mode is {r.mode})")
    if r.epochs < 0:
        raise ConfigError(f"run.epochs must be >= 0, got {r.epochs}")
    if r.replay_prob == "auto":
        if r.mode != "async":
            raise ConfigError(f"run.replay_prob auto fills with replay what async generation has not made yet: it needs run.mode async "
                              f"(run.mode is {r.mode}; give a number for a fixed ratio)")
        if not 0.0 <= r.replay_max <= 1.0:
            raise ConfigError(f"run.replay_max must be in [0, 1], got {r.replay_max}")
    elif not 0.0 <= r.replay_prob <= 1.0:
        raise ConfigError(f"run.replay_prob must be in [0, 1] or auto, got {r.replay_prob}")
    if r.mode == "offline" and r.replay_prob:
        raise ConfigError("run.replay_prob applies to generated data (sync, async, frozen); offline runs pass over data.path in epochs")
    if r.mode == "sync" and r.sync_every != 1:
        raise ConfigError("run.mode=sync loads every new version before the next step: it needs run.sync_every=1 (use run.mode=async)")
    b = cfg.buffer
    if b.replay_window < 0 or b.replay_max_uses < 0:
        raise ConfigError(f"buffer.replay_window and buffer.replay_max_uses must be >= 0, got {b.replay_window}, {b.replay_max_uses}")
    if not r.eval_task and (r.eval_task_path is not None or r.eval_task_options is not None):
        raise ConfigError("run.eval_task_path and run.eval_task_options belong to run.eval_task, which is not set: without it the "
                          "evaluation uses the training task as configured (generator.task_path, generator.task_options)")
    if not isinstance(r.loggers, list) or not all(isinstance(n, str) for n in r.loggers):
        raise ConfigError(f"run.loggers must be a list of names, e.g. [wandb, mlflow], got {r.loggers!r}")
    from agro_dist.run.trackers import check_loggers

    try:
        check_loggers(r.loggers)
    except ValueError as e:
        raise ConfigError(f"run.loggers: {e}") from None
    if not isinstance(r.env_vars, dict) or not all(isinstance(k, str) and k for k in r.env_vars):
        raise ConfigError(f"run.env_vars must be a mapping of variable names to values, got {r.env_vars!r}")
    if not b.redis_maxmemory_gb >= 0:
        raise ConfigError(f"buffer.redis_maxmemory_gb must be >= 0 (0: a quarter of the node's memory), got {b.redis_maxmemory_gb}")
    if b.replay_weighting not in ("uniform", "recency"):
        raise ConfigError(f"buffer.replay_weighting must be uniform or recency, got {b.replay_weighting!r}")
    if r.eval_engine not in ("auto", "generator", "separate"):
        raise ConfigError(f"run.eval_engine must be auto, generator or separate, got {r.eval_engine!r}")
    if r.eval_engine == "generator" and r.mode not in ("sync", "async"):
        raise ConfigError(f"run.eval_engine=generator needs generators that follow the learner (sync, async); run.mode={r.mode} "
                          "evaluates on its own engine: use run.eval_engine auto or separate")
    if r.connect_timeout_s <= 0 or r.startup_timeout_s <= 0:
        raise ConfigError("run.connect_timeout_s and run.startup_timeout_s must be > 0")
    if r.max_staleness is not None and r.max_staleness < 0:
        raise ConfigError(f"run.max_staleness must be >= 0 or null, got {r.max_staleness}")
    if r.sync_every < 1:
        raise ConfigError(f"run.sync_every must be >= 1, got {r.sync_every}")
    if r.mode == "offline" and r.max_generated:
        raise ConfigError("run.max_generated counts generated completions: offline runs generate none (use run.epochs or run.steps)")
    if not (r.steps or r.max_samples or r.max_generated or r.max_minutes or (r.mode == "offline" and r.epochs)):
        raise ConfigError("set a budget: run.steps, run.max_samples, run.max_generated, run.max_minutes (or run.epochs offline)")
    if res.num_generators < 1 or res.learner_ranks < 1:
        raise ConfigError("resources.num_generators and resources.learner_ranks must be >= 1")
    if res.learner_placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ConfigError(f"resources.learner_placement must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {res.learner_placement!r}")
    for k in ("generator_resources", "learner_resources", "eval_resources"):
        v = getattr(res, k)
        if not isinstance(v, dict) or not all(isinstance(n, str) and isinstance(x, (int, float)) and x >= 0 for n, x in v.items()):
            raise ConfigError(f"resources.{k} must map resource names to amounts >= 0, e.g. {{gen_node: 1}}; got {v!r}")
        if set(v) & {"CPU", "GPU", "memory"}:
            raise ConfigError(f"resources.{k}: CPU, GPU and memory have their own keys (resources.*_cpus, *_gpus, *_memory_gb)")
    if lc.pack not in PACKINGS:
        raise ConfigError(f"learner.pack must be {', '.join(PACKINGS)}, got {lc.pack!r}")
    if lc.pack == "prefix" and lc.gradient_checkpointing:
        raise ConfigError("learner.pack prefix keeps the prompts' keys and values, which learner.gradient_checkpointing drops: "
                          "use learner.pack rows (or none) with it")
    if lc.micro_tokens < 0:
        raise ConfigError(f"learner.micro_tokens must be >= 0 (0: micro-batches of learner.micro_groups groups), got {lc.micro_tokens}")
    if lc.micro_tokens and lc.zero_stage == 3:
        raise ConfigError("learner.micro_tokens needs learner.zero_stage 0-2 (ZeRO 3 takes one micro-batch per step here)")
    if lc.batch_groups % res.learner_ranks or (not lc.micro_tokens and (lc.batch_groups // res.learner_ranks) % lc.micro_groups):
        raise ConfigError(f"learner.batch_groups ({lc.batch_groups}) must split into resources.learner_ranks ({res.learner_ranks}) "
                          f"x a multiple of learner.micro_groups ({lc.micro_groups})")
    t = lc.temperature
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0):
        raise ConfigError(f"learner.temperature must be a number > 0 or null (= generator.temperature), got {t!r}")
    if lc.lora_rank < 0 or lc.lora_alpha < 0 or not 0 <= lc.lora_dropout < 1:
        raise ConfigError(f"learner.lora_rank and lora_alpha must be >= 0 and lora_dropout in [0, 1), got {lc.lora_rank}, "
                          f"{lc.lora_alpha}, {lc.lora_dropout}")
    if lc.lora_rank and lc.zero_stage == 3:
        raise ConfigError("learner.lora_rank > 0 trains a few MB of adapters: use learner.zero_stage 0-2 (ZeRO 3 with peft is not "
                          "supported here)")
    if lc.lora_rank and lc.ref_model not in (None, cfg.model):
        raise ConfigError("learner.lora_rank > 0: the reference is the base model with the adapters off, so learner.ref_model must be "
                          f"unset (got {lc.ref_model})")
    _check_on_policy(cfg)
    if not os.environ.get("AGRO_ALLOW_REDIS_6379") and cfg.buffer.redis_port == 6379:
        raise ConfigError("buffer.redis_port 6379 is Ray's default GCS port; pick another")


def _check_on_policy(cfg: Config) -> None:
    """Refuse a loss that assumes samples of the current policy (agro_on, rloo, the causal and
    local KL estimators) on any other data, before anything starts: it would run, and silently
    estimate something else."""
    from agro_dist.core.losses import get_loss, needs_on_policy_data  # torch: only when a run is validated

    lc, r, g = cfg.learner, cfg.run, cfg.generator
    try:
        get_loss(lc.loss)
    except ValueError as e:
        raise ConfigError(f"learner.loss: {e}") from None
    if not isinstance(lc.loss_options, dict) or not needs_on_policy_data(lc.loss, **lc.loss_options):
        return
    if lc.loss_options.get("lr_baseline") == "loo_var" and g.n < 3:
        raise ConfigError(f"learner.loss_options lr_baseline loo_var estimates the variance of R from the other n - 1 completions "
                          f"of a group: it needs generator.n >= 3 (got {g.n})")
    what = f"learner.loss {lc.loss}" + (f" with loss_options {lc.loss_options}" if lc.loss_options else "")
    why = None
    if r.mode != "sync":
        why = {"async": "run.mode async trains on groups sampled by earlier weights (up to run.max_staleness versions old)",
               "frozen": "run.mode frozen trains on samples of pi_ref, not of the policy being trained",
               "offline": "run.mode offline trains on logged data from another sampler"}.get(r.mode, f"run.mode is {r.mode}")
    elif r.replay_prob == "auto" or r.replay_prob:
        why = f"run.replay_prob {r.replay_prob} replays groups sampled by earlier weights"
    elif g.temperature <= 0:
        why = "generator.temperature 0 samples greedily, not from the policy"
    elif g.top_p < 1:
        why = f"generator.top_p {g.top_p} samples from a truncated policy, which the learner does not score"
    elif abs(cfg.learner_temperature - g.temperature) > 1e-12:
        why = (f"learner.temperature {cfg.learner_temperature:g} scores another policy than the one generator.temperature "
               f"{g.temperature:g} samples")
    if why:
        raise ConfigError(f"{what} assumes samples of the current policy (y ~ pi), but {why}. Use learner.loss agro_off, which is "
                          "unbiased for data from any sampler (or run.mode sync with run.replay_prob 0 for an on-policy loss)")


def check_tasks(cfg: Config) -> None:
    """Load the training and evaluation tasks as the actors will (data files read, options
    checked) and refuse, before anything starts, a training task with no training problems or an
    evaluation task with no held-out problems. Errors name the key and the file/line/field."""
    from agro_dist.tasks.problems import load_task

    def load_as(what: str, name: str, path: Optional[str], opts: Optional[Dict[str, Any]]):
        try:
            return load_task(name, path, **(opts or {}))
        except TypeError as err:  # an option the task does not take
            raise ConfigError(f"{what}={name}: bad task options {opts}: {err}") from None
        except (ValueError, OSError) as err:
            raise ConfigError(f"{what}={name} (path {path}): {err}") from None

    g = cfg.generator
    if g.reward_fn:
        from agro_dist.tasks.rewards import check_reward_spec

        try:
            check_reward_spec(g.reward_fn)
        except ValueError as err:
            raise ConfigError(f"generator.reward_fn: {err}") from None
    task = load_as("generator.task", g.task, g.task_path, g.task_options)
    try:
        if cfg.run.mode != "offline":  # offline trains on data.path; the task only evaluates
            next(task.train(seed=cfg.run.seed))
    except (ValueError, StopIteration):
        hint = (" (MATH-500 is an evaluation set: train on math, e.g. --generator.task math --generator.task_path "
                "../shared/data/math, and evaluate with --run.eval_task math500 --run.eval_task_path ../shared/data/math500)"
                if g.task == "math500" else " (give a file with training problems, or use it as run.eval_task)")
        raise ConfigError(f"generator.task={g.task}: no training problems in {g.task_path}{hint}") from None
    what = "generator.task"
    if cfg.run.eval_task:
        e = cfg.eval_generator_config()
        what = "run.eval_task"
        task = load_as(what, e["task"], e["task_path"], e["task_options"])
    if not task.eval_set(cfg.run.eval_size or None):
        raise ConfigError(f"{what}: no held-out problems to evaluate on")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m agro_dist",
        description="Train a language model with AGRO on Ray: vLLM generator actors -> Redis/Arrow replay buffer -> "
                    "DeepSpeed learner, weights broadcast back. Every key below can be set in the --config YAML "
                    "(sections run:, generator:, learner:, buffer:, resources:) or here; the command line wins. "
                    "Values are YAML: --run.max_staleness null, --learner.adam_betas '[0.9, 0.95]'.",
    )
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for key, default in keys():
        p.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="V",
                       help=f"{HELP.get(key, '')} (default: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()})")
    return p


def markdown_table() -> str:
    """Every key, its default and its help as a Markdown table: ``docs/config.md`` is this
    (``python -m agro_dist.run.config markdown``; a test keeps them equal), from the text ``--help`` shows."""
    def default(v: Any) -> str:
        return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()

    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{default(v)}` | {HELP.get(k, '').replace('|', chr(92) + '|')} |" for k, v in keys()]
    return "\n".join(lines) + "\n"


CONFIG_DOC_HEAD = """# Every config key

Generated from the same text as `python -m agro_dist --help` (`python -m agro_dist.run.config markdown >
docs/config.md`; a test keeps this file equal to it). Keys are `section.key` in a `--config` YAML
file (sections `run:`, `generator:`, `learner:`, `data:`, `buffer:`, `resources:`, plus the
top-level `model`) or `--section.key VALUE` on the command line, which wins. Values are YAML.

"""


JOB_STORAGE = "~/agro_dist_results"  # Ray Train's ~/ray_results, for agro_dist


def in_ray_job() -> bool:
    """Whether this process is the driver of a ``ray job submit`` (Ray's job supervisor sets this)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def from_args(argv: Optional[List[str]] = None) -> Tuple[Config, argparse.Namespace]:
    p = parser()
    ns = p.parse_args(argv)
    overrides = {}
    for key, _ in keys():
        if hasattr(ns, key):
            raw = getattr(ns, key)
            try:
                overrides[key] = yaml.safe_load(raw)
            except yaml.YAMLError:
                overrides[key] = raw
    # A string-typed key given a value YAML reads as a number (run.name 2024) stays a string.
    defaults = dict(keys())
    for k, v in overrides.items():
        if isinstance(defaults.get(k), str) and not isinstance(v, str) and v is not None:
            overrides[k] = str(getattr(ns, k))
    cfg = load(ns.config, overrides, check=False)
    if cfg.run.storage_path is None and in_ray_job() and not os.path.isabs(os.path.expanduser(cfg.run.output_dir)):
        # A Ray job's working directory is a temporary copy on the driver's node: never keep results there.
        cfg.run.storage_path = JOB_STORAGE
        overrides["run.storage_path"] = JOB_STORAGE
    if cfg.run.resume:  # the saved config first, then what is given now; validated once merged
        cfg = resume_config(cfg, {**(_read(ns.config) if ns.config else {}), **overrides})
    validate(cfg)
    return cfg, ns


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["markdown"]:
        sys.exit("usage: python -m agro_dist.run.config markdown > docs/config.md")
    sys.stdout.write(CONFIG_DOC_HEAD + markdown_table())

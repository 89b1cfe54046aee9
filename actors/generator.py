"""The generator: a vLLM engine that samples groups of scored completions for a task.

``Generator`` draws prompts from a task, samples ``n`` completions per prompt with the current
weights, records each sampled token's log-probability under the distribution it was drawn from
(the behaviour log-probs: vLLM's ``processed_logprobs``, i.e. after the temperature and top-p; the
learner scores at the same temperature, so on-policy they are the learner's own log-probs),
scores them with the task's reward function (time-limited worker processes), and returns
``agro_dist.core.records.Group``s tagged with the weights' version. ``GeneratorActor`` is the same as
a Ray actor, optionally putting its groups straight into the replay buffer.

Weights: ``update_weights(version, weights)`` swaps the engine's weights in place from a state
dict (what the learner publishes through Ray's object store; a Ray actor call receives the
dict, already fetched) or a folder of safetensors. The engine runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the new tensors go straight into vLLM's loader
without a copy through files; an NCCL broadcast on GPU clusters would feed the same loader.
Calls on one generator are sequential, so weights never change in the middle of a group.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Union

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # before vllm is imported
# Start-up noise a user cannot act on, kept out of the run's log (a worker's lines reach the
# driver): vLLM configures its loggers only when an engine starts, so what it logs while being
# imported ("Triton is installed, but doesn't include CPU backend") ignored VLLM_LOGGING_LEVEL;
# and its own code trips torch's FutureWarnings (torch.distributed.reduce_op).
try:
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "").upper() or logging.NOTSET)
except ValueError:  # not a level name: vLLM says so itself when it configures logging
    pass
warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")

from agro_dist.core.records import Completion, Group  # noqa: E402
from agro_dist.io.models import resolve_model  # noqa: E402
from agro_dist.tasks.problems import Problem, load_task  # noqa: E402
from agro_dist.tasks.rewards import RewardScorer, reward_parts  # noqa: E402

if TYPE_CHECKING:
    import torch

log = logging.getLogger("agro_dist.generator")


EVAL_SAMPLES_SHOWN = 4  # sampled completions each evaluation returns with its accuracies (the run's samples.jsonl)


@dataclass
class GeneratorConfig:
    model: str = "default"  # a HF folder, or "default" (SmolLM2-135M-Instruct)
    task: str = "arithmetic"  # arithmetic, math, math500, gsm8k, jsonl
    task_path: Optional[str] = None
    task_options: Dict[str, Any] = field(default_factory=dict)
    reward_fn: Optional[str] = None  # default: the task's ("numeric" or "math"); or "pkg.mod:fn"
    reward_timeout_s: float = 5.0
    n: int = 4  # completions per prompt (a group)
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 128
    stop: List[str] = field(default_factory=list)
    prompts_per_call: int = 8
    seed: int = 0
    generator_id: str = "gen-0"
    max_model_len: int = 1024
    dtype: str = "auto"  # float32 on CPU, bfloat16 on GPU
    kv_cache_gb: float = 0.0  # CPU backend: KV cache size; 0 = auto (see _auto_kv_cache_bytes)
    vllm: Dict[str, Any] = field(default_factory=dict)  # extra vllm.LLM arguments


class Generator:
    def __init__(self, cfg: Union[GeneratorConfig, Dict[str, Any]]):
        self.cfg = cfg = cfg if isinstance(cfg, GeneratorConfig) else GeneratorConfig(**cfg)
        self.model_path = resolve_model(cfg.model)
        self.task = load_task(cfg.task, cfg.task_path, **cfg.task_options)
        self.scorer = RewardScorer(cfg.reward_fn or self.task.reward_fn, timeout_s=cfg.reward_timeout_s)
        # Held-out accuracy is scored by one function: the first of several (docs/rewards.md), not their weighted sum.
        self.eval_scorer = self.scorer if not isinstance(cfg.reward_fn, list) else \
            RewardScorer(accuracy_spec(cfg.reward_fn), timeout_s=cfg.reward_timeout_s)
        import torch  # here, not at the top: the driver imports this module for GeneratorActor only
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        kw = dict(model=self.model_path, dtype=dtype, seed=cfg.seed, max_model_len=cfg.max_model_len,
                  enforce_eager=not on_gpu, gpu_memory_utilization=0.5 if not on_gpu else 0.85,
                  use_tqdm_on_load=False,  # a progress bar per (re)start in the run's log
                  # The sampler's own log-probs (after temperature and top-p), not the untempered
                  # model's: grpo's ratio and behaviour_drift divide by what actually sampled.
                  logprobs_mode="processed_logprobs")
        # CPU: the KV cache is allocated whole at start-up, so its size is resident memory for the
        # engine's life. A user's VLLM_CPU_KVCACHE_SPACE (whole GiB) still wins, as in vLLM.
        if not on_gpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and "kv_cache_memory_bytes" not in cfg.vllm:
            kw["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * 1e9) if cfg.kv_cache_gb > 0 else self._auto_kv_cache_bytes(dtype)
        kw.update(cfg.vllm)
        t = time.perf_counter()
        self.llm = LLM(**kw)
        self.load_s = time.perf_counter() - t
        _return_freed_memory()  # vLLM's start-up (loading, its profiling run) leaves ~0.2 GB freed but resident
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self._problems = self.task.train(seed=cfg.seed)
        self._eval_tasks: Dict[str, tuple] = {}  # other tasks this generator evaluates on (run.eval_task)
        self.stats = dict(groups=0, completions=0, tokens=0, generate_s=0.0, reward_s=0.0, weight_updates=0, weight_update_s=0.0,
                          prompts_too_long=0)

    def _auto_kv_cache_bytes(self, dtype: str) -> int:
        """Room for two training calls at once: ``2 x n x prompts_per_call`` sequences of the
        longest of 32 training prompts + ``max_tokens``, in whole 128-token blocks (vLLM's CPU
        block), and at least one ``max_model_len`` sequence. A bigger batch (an evaluation of
        many problems x samples) runs in waves; the default run's evaluation takes ~1.2x longer
        than with room for all of it at once (144 sequences) and the engine holds ~0.5 GB less."""
        from transformers import AutoConfig, AutoTokenizer

        cfg, block = self.cfg, 128
        hf = AutoConfig.from_pretrained(self.model_path)
        hf = getattr(hf, "text_config", hf)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        per_token = 2 * hf.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
        tok = AutoTokenizer.from_pretrained(self.model_path)
        it = self.task.train(seed=cfg.seed)
        longest = max(len(tok.encode(self.task.prompt(tok, next(it)))) for _ in range(32))
        seq = min(cfg.max_model_len, longest + cfg.max_tokens)
        blocks = 2 * cfg.n * cfg.prompts_per_call * -(-seq // block)
        blocks = max(blocks, -(-cfg.max_model_len // block))
        return blocks * block * per_token

    # ------------------------------------------------------------------ sampling

    def _sampling(self, *, n: int, temperature: float, max_tokens: Optional[int] = None):
        from vllm import SamplingParams

        cfg = self.cfg
        # No per-request seed: with one, vLLM-CPU 0.32 crashes ("CPU Generator does not use offset")
        # once a batch is large enough for chunked prefill. The engine's seed (cfg.seed) is enough.
        return SamplingParams(n=n, temperature=temperature, top_p=cfg.top_p if temperature > 0 else 1.0,
                              max_tokens=max_tokens or cfg.max_tokens, stop=cfg.stop or None, logprobs=0)

    def _prompt(self, problem: Problem, task=None) -> str:
        return (task or self.task).prompt(self.tokenizer, problem)

    def _fits(self, problem: Problem, task=None) -> bool:
        """Whether the problem's prompt leaves room for at least one completion token in
        ``max_model_len`` (vLLM refuses a longer prompt, which would stop the whole run)."""
        return len(self.tokenizer.encode(self._prompt(problem, task))) < self.cfg.max_model_len

    def _next_problem(self) -> Problem:
        for _ in range(10_000):
            p = next(self._problems)
            if self._fits(p):
                return p
            self.stats["prompts_too_long"] += 1
            if self.stats["prompts_too_long"] in (1, 10, 100, 1000):
                log.warning("generator %s: %d training prompt(s) longer than max_model_len=%d skipped so far (e.g. %s)",
                            self.cfg.generator_id, self.stats["prompts_too_long"], self.cfg.max_model_len, p.id)
        raise ValueError(f"task {self.task.name}: no training prompt fits max_model_len={self.cfg.max_model_len} in 10000 draws")

    def _generate(self, problems: List[Problem], sp, *, task=None, count: bool = True) -> List[Any]:
        """``count``: add the time to the training generation's (the tokens/s metric); not for evaluations."""
        prompts = [self._prompt(p, task) for p in problems]
        t = time.perf_counter()
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        if count:
            self.stats["generate_s"] += time.perf_counter() - t
        return outs

    def generate(self, num_prompts: Optional[int] = None) -> List[Group]:
        """Groups for the next ``num_prompts`` training problems, scored and version-tagged."""
        problems = [self._next_problem() for _ in range(num_prompts or self.cfg.prompts_per_call)]
        outs = self._generate(problems, self._sampling(n=self.cfg.n, temperature=self.cfg.temperature))
        groups = []
        for prob, out in zip(problems, outs):
            comps = []
            t = time.perf_counter()
            rewards = self.scorer.score([o.text for o in out.outputs], prob.answer, prob.metadata, prob.messages or prob.question)
            self.stats["reward_s"] += time.perf_counter() - t
            for o, r in zip(out.outputs, rewards):
                ids = list(o.token_ids)
                # logprobs=0: each position's dict holds the sampled token (vLLM may add no others).
                lps = [d[tid].logprob for d, tid in zip(o.logprobs, ids)]
                comps.append(Completion(ids, lps, r, o.finish_reason or "unknown", o.text))
                self.stats["tokens"] += len(ids)
            groups.append(Group(prompt_id=prob.id, prompt=out.prompt, prompt_token_ids=list(out.prompt_token_ids),
                                completions=comps, policy_version=self.version, generator_id=self.cfg.generator_id,
                                metadata=dict(prob.metadata, task=self.task.name)))
        self.stats["groups"] += len(groups)
        self.stats["completions"] += sum(g.n for g in groups)
        return groups

    # ------------------------------------------------------------------ weights

    def update_weights(self, version: int, weights: Union[Mapping[str, torch.Tensor], str]) -> float:
        """Swap the engine's weights in place; later groups carry ``version``. Returns seconds.

        ``weights``: a state dict with Hugging Face names (the learner's ``publish()``; packed by
        ``agro_dist.io.weights`` when it came through the object store), LoRA adapters (``learner.lora_rank``:
        merged here over the base model this engine loaded, read again from its safetensors), or a
        folder / ``.safetensors`` file."""
        from agro_dist.io.weights import is_adapters, is_packed, iter_safetensors, merge_adapters, unpack

        t = time.perf_counter()
        if is_packed(weights):  # the learner actor's publish: tensors over the object store's memory
            weights = unpack(weights)
        if isinstance(weights, str):  # a model folder or file, read one tensor at a time (memory-mapped)
            pairs = iter_safetensors(weights)
        elif is_adapters(weights):  # merged one tensor at a time over the base file (page cache), not a copy of the model
            pairs = merge_adapters(iter_safetensors(self.model_path), weights)
        else:
            pairs = iter(weights.items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.version = int(version)
        dt = time.perf_counter() - t
        self.stats["weight_updates"] += 1
        self.stats["weight_update_s"] += dt
        return dt

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, size: Optional[int] = None, *, samples: int = 1, task: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Greedy and sampled accuracy on the task's held-out problems, with the current weights,
        and (``samples``) the first sampled completion of the first few problems with its reward.

        ``task``: evaluate on another task instead (``{task, task_path, task_options, reward_fn}``,
        loaded once and kept): a generator that also evaluates (the default run) serves
        ``run.eval_task`` without a second engine. The training stream is not touched.

        The sampled answers are drawn from a random stream seeded afresh with ``seed`` for every
        evaluation (and the stream in use restored afterwards), so the same weights give the same
        numbers whenever they are evaluated: in a run, in ``python -m agro_dist.evaluate``, first or
        tenth. (vLLM samples with torch's default generator here; per-request seeds would crash
        vLLM-CPU 0.32's chunked prefill.)"""
        import torch

        state = torch.get_rng_state()
        torch.manual_seed(self.cfg.seed)
        # Prompts cached by earlier training calls would change how vLLM schedules this batch, and
        # with it which random numbers each answer gets: start from an empty cache, as a fresh engine does.
        self.llm.reset_prefix_cache()
        try:
            return self._evaluate(size, samples, *self._eval_task(task))
        finally:
            torch.set_rng_state(state)

    def _eval_task(self, spec: Optional[Dict[str, Any]]):
        """(task, scorer) of an evaluation: the training task's, or another kept by its spec."""
        if not spec:
            return self.task, self.eval_scorer
        key = repr(sorted(spec.items()))
        if key not in self._eval_tasks:
            task = load_task(spec["task"], spec.get("task_path"), **(spec.get("task_options") or {}))
            scorer = RewardScorer(accuracy_spec(spec.get("reward_fn") or task.reward_fn), timeout_s=self.cfg.reward_timeout_s)
            self._eval_tasks[key] = (task, scorer)
        return self._eval_tasks[key]

    def _evaluate(self, size: Optional[int], samples: int, task, scorer) -> Dict[str, Any]:
        t0 = time.perf_counter()
        problems = task.eval_set(size)
        fit = [p for p in problems if self._fits(p, task)]
        if len(fit) < len(problems):  # counted apart: the accuracy is over the problems that fit
            log.warning("evaluation: %d of %d held-out prompts are longer than max_model_len=%d and are left out",
                        len(problems) - len(fit), len(problems), self.cfg.max_model_len)
        out: Dict[str, float] = {"version": float(self.version), "eval_problems": float(len(fit)),
                                 "eval_too_long": float(len(problems) - len(fit))}
        problems = fit
        shown: List[Dict[str, Any]] = []  # the first sampled completion of the first few problems, for a person to read
        for mode, sp in (("greedy", self._sampling(n=1, temperature=0.0)),
                         ("sampled", self._sampling(n=samples, temperature=self.cfg.temperature))):
            res = self._generate(problems, sp, task=task, count=False)
            correct, total = 0.0, 0
            for prob, r in zip(problems, res):
                scores = scorer.score([o.text for o in r.outputs], prob.answer, prob.metadata, prob.messages or prob.question)
                correct += sum(scores)
                total += len(scores)
                if mode == "sampled" and len(shown) < EVAL_SAMPLES_SHOWN:
                    shown.append(dict(version=self.version, prompt=prob.question, completion=r.outputs[0].text, reward=scores[0],
                                      answer=prob.answer))
            out[f"{mode}_accuracy"] = correct / max(total, 1)
        out["sample_completions"] = shown
        out["eval_s"] = time.perf_counter() - t0  # its own time: eval.csv's eval_s
        return out

    def close(self) -> None:
        self.scorer.close()
        if self.eval_scorer is not self.scorer:
            self.eval_scorer.close()
        for _, scorer in self._eval_tasks.values():
            scorer.close()


def accuracy_spec(spec: Any) -> Any:
    """The reward function that scores held-out accuracy: ``generator.reward_fn`` itself, or the
    first of a list (a weighted sum of several is a reward, not an accuracy; docs/rewards.md)."""
    return reward_parts(spec)[0].fn if isinstance(spec, list) else spec


def _return_freed_memory() -> None:
    """glibc's ``malloc_trim``: give memory freed on the heap back to the system (not elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name and "libc" in name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            pass


SCRATCH_PREFIX = "agro_dist-gen-"
# Every process-owned scratch folder: a generator's, and a driver's for the private Ray it starts
# (agro_dist.run.startup.own_ray_tmpdir). Removed once the process is gone.
SCRATCH_PREFIXES = (SCRATCH_PREFIX, "agro_dist-run-")


def own_tmpdir() -> str:
    """Make this process's temporary folder ``<tmp>/agro_dist-gen-<pid>`` (``TMPDIR`` and
    ``tempfile.tempdir``) after removing those of generator processes no longer alive.

    Why: vLLM leaves a rendezvous file (``vllm_dist_<uuid>``, the FileStore of its world of one)
    in the temporary folder for every engine it starts, and multiprocessing its ``pymp-*``
    folders; they go only when the process exits cleanly, and generator actors are killed. The
    file cannot be removed while the process lives (torch.distributed groups made later in the
    process wait on it), so a generator's leftovers go when the next one starts, or when the
    driver ends (``remove_dead_tmpdirs``).

    torch's compile cache stays torch's default, ``<tmp>/torchinductor_<user>`` (or the user's
    ``TORCHINDUCTOR_CACHE_DIR``): vLLM's sampler compiles a kernel at the first call that asks for
    log-probs, and with the cache in the per-process folder every generator start (and restart)
    compiled it again, 15-30 s on CPU. torch fixes both the cache's folder (at first use, into
    ``TORCHINDUCTOR_CACHE_DIR``) and its precompiled headers' (when ``codecache`` is imported)
    from the temporary folder, so both are settled here before it moves. The headers go into the
    cache's folder: under a Ray the driver started, the temporary folder a worker inherits is
    already the run's own (``startup.own_ray_tmpdir``), and the header was compiled again at every
    run's first evaluation (9 s of g++ on this CPU)."""
    import tempfile

    base = tempfile.gettempdir()
    remove_dead_tmpdirs(base)
    try:
        from torch._inductor import codecache
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        headers = os.path.join(cache_dir(), "precompiled_headers")
        if getattr(codecache, "_HEADER_DIR", None) is not None:  # torch 2.13: module globals, read at each compile
            codecache._HEADER_DIR, codecache._HEADER_LOCK_DIR = headers, os.path.join(headers, "locks")
    except ImportError:  # another torch: a cold cache costs start-up time, nothing else
        pass
    d = os.path.join(base, f"{SCRATCH_PREFIX}{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    os.environ["TMPDIR"] = d
    tempfile.tempdir = d
    return d


def remove_dead_tmpdirs(base: Optional[str] = None) -> int:
    """Remove the temporary folders (``SCRATCH_PREFIXES``) of processes that no longer exist; how many."""
    import shutil
    import tempfile

    base = base or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        prefix = next((p for p in SCRATCH_PREFIXES if name.startswith(p)), None)
        pid = name[len(prefix):] if prefix else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or a zombie not yet reaped): keep
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        removed += 1
    return removed


class GeneratorWorker(Generator):
    """The Ray actor's body: a Generator that can also put its groups into the replay buffer.
    Its temporary files go to a folder of its own (``own_tmpdir``), removed once it is gone."""

    def __init__(self, cfg, *, buffer_url: Optional[str] = None, buffer_options: Optional[Dict[str, Any]] = None):
        self.tmpdir = own_tmpdir()  # before the engine starts: vLLM names its rendezvous file then
        super().__init__(cfg)
        self.buffer = None
        if buffer_url:
            from agro_dist.buffer import ReplayBuffer

            self.buffer = ReplayBuffer(buffer_url, **(buffer_options or {}))

    def produce(self, calls: int = 1, groups: Optional[int] = None) -> Dict[str, Any]:
        """Generate and put into the buffer ``groups`` groups (in vLLM calls of at most
        ``prompts_per_call`` prompts), or, without it, ``calls`` calls of ``prompts_per_call``.
        The driver asks for what the learner will take (generation follows demand)."""
        if self.buffer is None:
            raise RuntimeError("this generator was created without buffer_url")
        sizes = [self.cfg.prompts_per_call] * calls if groups is None else \
            [min(self.cfg.prompts_per_call, groups - s) for s in range(0, groups, self.cfg.prompts_per_call)]
        for k in sizes:
            self.buffer.put(self.generate(k))
        # The node it runs on travels with every result: after a restart (on another node, when
        # its own was lost) the driver learns where it is from its first answer, with no extra call.
        scorers = [self.scorer] + ([self.eval_scorer] if self.eval_scorer is not self.scorer else [])
        return dict(self.stats, version=self.version, reward_timeouts=sum(s.stats.timeouts for s in scorers),
                    reward_errors=sum(s.stats.errors for s in scorers), reward_parts=self.scorer.part_stats(),
                    node=_node_address())

    def get_version(self) -> int:
        return self.version

    def get_tmpdir(self) -> str:
        return self.tmpdir


def _node_address() -> Optional[str]:
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else None


def _ray_actor():
    import ray

    return ray.remote(GeneratorWorker)


GeneratorActor = _ray_actor()

"""The learner: a DeepSpeed engine that applies an AGRO loss to batches of groups.

One ``Learner`` per DeepSpeed rank (a torchrun process, or a Ray actor that sets the usual
``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``). Each ``train_step`` takes this rank's
share of a global batch of groups, computes reference log-probs (cached per group, so replayed
groups cost no second reference pass), runs forward/backward over micro-batches of whole groups,
and applies one optimizer step, or none if anything was non-finite. ``publish`` returns a real
copy of the weights with a version; ``save_checkpoint``/``load_checkpoint`` write and read an
atomic checkpoint (a Hugging Face folder plus DeepSpeed state, RNG states, version and the
caller's cursor) from which training continues bitwise.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from agro_dist.core.losses import get_loss, min_group_size, needs_behaviour_logprobs, needs_token_kl  # noqa: E402
from agro_dist.core.records import Group  # noqa: E402
from agro_dist.io.model_card import copy_tokenizer, write_model_card  # noqa: E402
from agro_dist.io.models import resolve_model  # noqa: E402
from agro_dist.io.storage import CheckpointWriteError, Storage, atomic_write, commit_checkpoint, display, fetch_checkpoint, is_remote, join, latest_checkpoint  # noqa: E402

from .batching import MicroBatch, Prefixed, check_groups, collate, has_behaviour_logprobs, split_by_tokens, split_to_count  # noqa: E402
from .config import PACKINGS, LearnerConfig  # noqa: E402,F401  (re-exported: agro_dist.learner.learner.LearnerConfig)
from .logprobs import chunked_logprobs, module_chunked_logprobs, token_kl, token_kl_metric  # noqa: E402
from . import lora  # noqa: E402

log = logging.getLogger("agro_dist.learner")
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
# transformers' progress bars ("Loading weights", "Writing model shards" at every checkpoint) would
# reach the run's console through Ray's log forwarding: one progress line per step is the log.
from transformers.utils import logging as _hf_logging  # noqa: E402

_hf_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}




class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW that refuses non-finite gradients: the whole step is skipped, gradients are
    cleared and ``overflow`` is set (DeepSpeed reads it, counts ``skipped_steps`` and does not
    call the LR scheduler). Gradient clipping happens here too, after the finite check, so the
    pre-clip norm is known (``last_grad_norm``). Used for ZeRO stage 0, where DeepSpeed has no
    fp32 overflow check; stages 1-3 check the gradient norm themselves."""

    def __init__(self, params, *, clip: float = 0.0, **kw):
        super().__init__(params, **kw)
        self.clip = clip
        self.overflow = False
        self.last_grad_norm = float("nan")

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.float()) for x in grads])) if grads else torch.zeros(())
        self.last_grad_norm = float(norm)
        self.overflow = not math.isfinite(self.last_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.clip > 0 and self.last_grad_norm > self.clip:
            for x in grads:
                x.mul_(self.clip / (self.last_grad_norm + 1e-6))
        return super().step(closure)


def _init_distributed() -> None:
    if dist.is_initialized():  # e.g. an in-process vLLM engine made a world of one already
        if dist.get_world_size() == 1:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts it
        return
    # A world that someone else destroyed (an in-process vLLM engine shutting down destroys the
    # one it made) leaves DeepSpeed's cached groups pointing at it: "Group ... is not registered"
    # when the next engine is built. Drop those references before making a new world.
    from deepspeed.utils import groups as ds_groups

    release = getattr(ds_groups, "_release_process_group_references", None)
    if release is not None:
        release(None)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:  # torchrun, or a Ray actor that set the usual variables
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        return
    # A lone process: a world of one over an in-memory store, made here rather than through
    # os.environ (which child processes would inherit); DeepSpeed adopts an initialised world.
    # Not a TCP port: a free port found by binding and closing can be taken by another process
    # before the store binds it (EADDRINUSE, seen once in CI while vLLM and Ray workers started
    # next to it). Not a file store: its folder outlived every process killed by Ray or SIGKILL.
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine asserts it; alone it selects nothing
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False, auto_mpi_discovery=False)


def response_hidden(model: torch.nn.Module, mb: MicroBatch, device: torch.device) -> torch.Tensor:
    """The final hidden states that predict the response tokens, [N, H] in ``resp_mask``'s
    row-major order: from the packed batch (each prompt once, ``batching.collate``'s ``pack``) or the padded one."""
    decoder = model.get_decoder()
    if isinstance(mb.packed, Prefixed):
        from transformers import DynamicCache

        pf = mb.packed
        out = decoder(input_ids=pf.prompt_ids.to(device), attention_mask=pf.prompt_mask.to(device), use_cache=True)
        hp, kv = out.last_hidden_state, out.past_key_values
        rows = pf.row_group.to(device)
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(kv.layers):  # each completion row over its group's prompt (a differentiable gather)
            cache.update(layer.keys.index_select(0, rows), layer.values.index_select(0, rows), i)
        hc = decoder(input_ids=pf.ids.to(device), attention_mask=pf.attention_mask.to(device), position_ids=pf.position_ids.to(device),
                     past_key_values=cache, use_cache=True).last_hidden_state
        H = hp.shape[-1]
        return torch.cat([hp.reshape(-1, H), hc.reshape(-1, H)])[pf.src.to(device)]
    if mb.packed is not None:
        pk = mb.packed
        out = decoder(input_ids=pk.input_ids.to(device), attention_mask=pk.attention_mask.to(device),
                      position_ids=pk.position_ids.to(device))
        h = out.last_hidden_state
        return h.reshape(-1, h.shape[-1])[pk.src.to(device)]
    out = decoder(input_ids=mb.input_ids.to(device), attention_mask=mb.attention_mask.to(device))
    return out.last_hidden_state[:, :-1][mb.resp_mask.to(device)]  # position j predicts token j + 1


def _check_lora(cfg: LearnerConfig, ref_path: str, model_path: str) -> None:
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {cfg.lora_rank}")
    if ref_path != model_path:
        raise ValueError("with lora_rank > 0 the reference is the base model with the adapters disabled: ref_model must be unset "
                         f"(or the model itself), got {cfg.ref_model}")
    if cfg.zero_stage == 3:
        raise ValueError("lora_rank > 0 with zero_stage 3 is not supported here (the adapters are a few MB: use zero_stage 0-2)")


def lr_at(cfg: LearnerConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        span = max(cfg.total_steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")


class Learner:
    def __init__(self, cfg: LearnerConfig):
        self.cfg = cfg
        if cfg.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
        lr_at(cfg, 0)  # validates the schedule name
        self.temperature = 1.0 if cfg.temperature is None else float(cfg.temperature)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (the policy scored is softmax(logits / temperature)), got {cfg.temperature}")
        self.loss_fn = get_loss(cfg.loss)
        self.need_token_kl = needs_token_kl(cfg.loss, **cfg.loss_options)
        self.need_ref_hidden = self.need_token_kl or cfg.exact_kl
        self.min_group_size = min_group_size(cfg.loss)
        self.need_behaviour = needs_behaviour_logprobs(cfg.loss)
        self.model_path = model_path = resolve_model(cfg.model)  # "default": the embedded SmolLM2
        ref_path = resolve_model(cfg.ref_model) if cfg.ref_model else model_path
        _init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cfg.pack not in PACKINGS:
            raise ValueError(f"pack must be one of {', '.join(PACKINGS)}, got {cfg.pack!r}")
        if cfg.pack == "prefix" and cfg.gradient_checkpointing:
            raise ValueError("pack 'prefix' keeps the prompts' keys and values, which gradient checkpointing drops: "
                             "use pack 'rows' (or 'none') with gradient_checkpointing")
        if cfg.micro_tokens < 0:
            raise ValueError(f"micro_tokens must be >= 0 (0: micro-batches of micro_groups groups), got {cfg.micro_tokens}")
        if cfg.micro_tokens and cfg.zero_stage == 3:
            raise ValueError("micro_tokens needs zero_stage 0-2: ZeRO 3 takes one micro-batch per step here (set micro_tokens 0)")
        if cfg.micro_tokens and cfg.batch_groups % self.world:
            raise ValueError(f"batch_groups={cfg.batch_groups} must be a multiple of world_size={self.world}")
        if cfg.micro_groups < 1:
            raise ValueError(f"micro_groups must be >= 1, got {cfg.micro_groups}")
        if not cfg.micro_tokens and cfg.batch_groups % (self.world * cfg.micro_groups):
            raise ValueError(
                f"batch_groups={cfg.batch_groups} must be a multiple of world_size * micro_groups = "
                f"{self.world} * {cfg.micro_groups}: every rank gets equal, whole micro-batches"
            )
        if cfg.zero_stage == 3 and cfg.batch_groups != self.world * cfg.micro_groups:
            # Measured with deepspeed 0.19.8 on CPU: ZeRO 3 accumulating over several micro-batches
            # gave a different update from ZeRO 0/2 (one micro-batch matched exactly).
            raise ValueError(
                "zero_stage=3 is supported with one micro-batch per step only: set micro_groups = "
                f"batch_groups / world_size = {cfg.batch_groups // self.world} (got {cfg.micro_groups})"
            )
        torch.manual_seed(cfg.seed)
        dtype = DTYPES[cfg.dtype]
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.pad_id = int(model.config.pad_token_id or 0)
        if cfg.lora_rank:
            _check_lora(cfg, ref_path, model_path)
            # The reference is the base model with the adapters disabled: no second copy.
            model = lora.wrap(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)
            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
            self.ref = None
        else:
            self.ref = AutoModelForCausalLM.from_pretrained(ref_path, dtype=dtype)
            self.ref.config.use_cache = False
            self.ref.eval().requires_grad_(False)
        ds_config = self._ds_config()
        params = [p for p in model.parameters() if p.requires_grad]
        kw = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if cfg.offload_optimizer:
            # ZeRO-Offload wants DeepSpeed's CPU Adam (built on first use), so the optimizer comes
            # from the config; DeepSpeed's overflow check guards the step (stages 1-3 only).
            if cfg.zero_stage == 0:
                raise ValueError("offload_optimizer needs zero_stage >= 1")
            ds_config["optimizer"] = {"type": "AdamW", "params": {**kw, "betas": list(kw["betas"])}}
            opt = None
        elif cfg.zero_stage == 0:
            opt = GuardedAdamW(params, clip=cfg.grad_clip, **kw)
        else:
            opt = torch.optim.AdamW(params, **kw)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, model_parameters=params, config=ds_config)
        if self.engine.device.type == "cuda" and self.ref is not None:
            self.ref.to(self.engine.device)
        self.value_head, self.value_opt = self._make_value_head(model.config.hidden_size)
        self.version = 0  # optimizer steps applied = the policy version it publishes
        self.skipped_batches = 0
        self._ref_cache: "collections.OrderedDict[str, List[torch.Tensor]]" = collections.OrderedDict()

    def _make_value_head(self, hidden: int):
        """V(x) for ``agro_single``: Linear(hidden, 1), zero-initialised, on the detached prompt state,
        so its loss trains the head alone (the policy's gradient is that of Eq. 4 with V as a
        baseline, unbiased for any V). Identical on every rank (gradients are averaged)."""
        if self.cfg.loss != "agro_single":
            return None, None
        head = torch.nn.Linear(hidden, 1, dtype=torch.float32, device=self.engine.device)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        opt = torch.optim.AdamW(head.parameters(), lr=self.cfg.value_lr, weight_decay=0.0)
        return head, opt

    def _values(self, h: torch.Tensor, mask: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
        """V(x) per row: the head on the hidden state of the prompt's last position (it predicts
        every completion's first token), detached. ``h``: [N, H] at the response positions. A
        group whose completions are all empty has no such state here: zeros."""
        counts = mask.sum(-1).tolist()
        first = [0, *itertools.accumulate(counts)]  # row r's response tokens start at first[r] in h
        hd = torch.cat([h.detach().float(), h.new_zeros(1, h.shape[-1], dtype=torch.float32)])
        idx, r = [], 0
        for n in group_sizes:
            rows = [first[i] for i in range(r, r + n) if counts[i] > 0]
            idx += [rows[0] if rows else h.shape[0]] * n
            r += n
        return self.value_head(hd[torch.tensor(idx, device=h.device)]).squeeze(-1)

    def _value_step(self, applied: bool) -> None:
        if self.value_head is None:
            return
        params = list(self.value_head.parameters())
        if applied:
            if self.world > 1:
                for p in params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad.div_(self.world)
            self.value_opt.step()
        self.value_opt.zero_grad(set_to_none=True)

    def _ds_config(self) -> Dict[str, Any]:
        cfg = self.cfg
        zero: Dict[str, Any] = {"stage": cfg.zero_stage}
        if cfg.zero_stage == 2:
            zero.update(overlap_comm=False, contiguous_gradients=True)
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        # By groups, every step has exactly this many micro-batches per rank and DeepSpeed applies
        # the optimizer on the last (its unmanaged mode lost gradients under ZeRO 3: measured). By
        # tokens the count varies: train_step marks the last micro-batch itself (the boundary).
        micro = cfg.micro_groups if not cfg.micro_tokens else cfg.batch_groups // self.world
        c = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": cfg.batch_groups // (self.world * micro),
            "zero_optimization": zero,
            # Stage 0 clips inside GuardedAdamW (which must see the pre-clip norm).
            "gradient_clipping": cfg.grad_clip if cfg.zero_stage > 0 else 0.0,
            "bf16": {"enabled": cfg.dtype == "bfloat16"},
            "fp16": {"enabled": False},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        return _merge(c, cfg.deepspeed)

    # ------------------------------------------------------------------ log-probs

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def _ref_head(self) -> torch.nn.Module:
        """The reference's output layer: its own, or (LoRA) the policy's, which no adapter changes."""
        return (self.ref if self.ref is not None else self.module).get_output_embeddings()

    def _logprobs(self, model, mb: MicroBatch, *, entropy: bool = False):
        """Per-token log-probs [R, L-1] (0 off the response), the entropy at response positions and
        the hidden states at them ([N, H], ``response_hidden``)."""
        h = response_hidden(model, mb, self.engine.device)
        mask = mb.resp_mask.to(h.device)
        targets = mb.input_ids[:, 1:].to(h.device)[mask]
        head = model.get_output_embeddings()
        if self.cfg.zero_stage == 3 and model is self.module:
            # ZeRO 3 partitions lm_head's weight outside its forward: call the module per chunk
            # (DeepSpeed gathers the weight) under checkpointing, so the backward recomputes it.
            lp, ent = module_chunked_logprobs(h, head, targets, chunk=self.cfg.logprob_chunk, entropy=entropy, temperature=self.temperature)
        else:
            lp, ent = chunked_logprobs(h, head.weight, targets, chunk=self.cfg.logprob_chunk, entropy=entropy, temperature=self.temperature)
        full = torch.zeros(mask.shape, dtype=lp.dtype, device=h.device).masked_scatter(mask, lp)
        return full, ent, h

    @torch.no_grad()
    def _ref_logprobs(self, mb: MicroBatch, groups: Sequence[Group]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Reference log-probs [R, L-1], from the cache where every group of the micro-batch is
        in it (replayed groups), else one reference forward (whose results are cached)."""
        cached = [self._ref_cache.get(g.group_id) for g in groups]
        if not self.need_ref_hidden and all(c is not None for c in cached):
            for g in groups:
                self._ref_cache.move_to_end(g.group_id)
            rows = [t for c in cached for t in c]
            out = torch.zeros(mb.resp_mask.shape, dtype=torch.float32)
            out[mb.resp_mask] = torch.cat(rows)
            return out, None
        if self.ref is not None:
            full, _, h = self._logprobs(self.ref, mb)
        else:
            with lora.adapters_off(self.module):
                full, _, h = self._logprobs(self.module, mb)
        full = full.float().cpu()
        r = 0
        for g in groups:
            rows = [full[r + i][mb.resp_mask[r + i]].clone() for i in range(g.n)]
            r += g.n
            self._ref_cache[g.group_id] = rows
            self._ref_cache.move_to_end(g.group_id)
        while len(self._ref_cache) > self.cfg.ref_cache_groups:
            self._ref_cache.popitem(last=False)
        return full, (h if self.need_ref_hidden else None)

    # ------------------------------------------------------------------ training

    def train_step(
        self,
        groups: Sequence[Group],
        *,
        staleness: Optional[Sequence[int]] = None,
        replay_age: Optional[Sequence[int]] = None,
        replay_fraction: Optional[float] = None,
        wait_s: float = 0.0,
    ) -> Dict[str, float]:
        """One optimizer step on this rank's ``batch_groups / world_size`` groups.

        ``staleness``: versions behind of the batch's fresh groups; ``replay_age``: the same for its
        replayed groups (they are as old as the history; ``max_staleness`` bounds fresh ones only).

        Returns metrics (floats): loss parts, reward, regularised reward, ``kl`` (exact, see
        ``exact_kl``) and ``log_ratio``, entropy, grad norm, fresh staleness and replay age, replay
        fraction, tokens/s and the step time split. A batch whose
        loss or gradients are non-finite is not applied (``skipped`` = 1, counted, logged).
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        per_rank = cfg.batch_groups // self.world
        if len(groups) != per_rank:
            raise ValueError(f"train_step wants this rank's {per_rank} groups (batch_groups / world_size), got {len(groups)}")
        check_groups(groups, self.min_group_size)
        if self.need_behaviour and not all(has_behaviour_logprobs(g) for g in groups):
            raise ValueError(f"{cfg.loss} needs the sampler's log-probs of every completion; these groups have none (logged data "
                             "without behavior_logprobs): use agro_off, which needs none")
        chunks = self._micro_batches(groups)
        mbs = [collate(c, pad_id=self.pad_id, pad_multiple=cfg.pad_to_multiple_of, pack=cfg.pack, pack_tokens=cfg.pack_tokens) for c in chunks]
        times = collections.Counter()
        sums: Dict[str, float] = collections.defaultdict(float)
        ent_sum, ent_n, drift_sum, drift_n = 0.0, 0, 0.0, 0
        bad = False
        self.engine.train()
        lr = lr_at(cfg, self.version)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        for mb, gs in zip(mbs, chunks):
            if cfg.micro_tokens:
                self.engine.set_gradient_accumulation_boundary(mb is mbs[-1])
            t = time.perf_counter()
            ref_lp, ref_h = self._ref_logprobs(mb, gs)
            times["ref_s"] += time.perf_counter() - t
            t = time.perf_counter()
            logps, ent, h = self._logprobs(self.module, mb, entropy=True)
            dev = logps.device
            mask = mb.resp_mask.to(dev)
            opts = dict(cfg.loss_options)
            kl = None
            if self.need_token_kl:
                W = self.module.get_output_embeddings().weight
                kl = token_kl(h, W, ref_h, self._ref_head().weight, chunk=cfg.logprob_chunk, temperature=self.temperature)
                opts["token_kl"] = torch.zeros(mask.shape, dtype=kl.dtype, device=dev).masked_scatter(mask, kl)
            if self.value_head is not None:
                opts["values"] = self._values(h, mask, mb.group_sizes)
            if self.need_behaviour:  # grpo's ratio pi / mu against the sampler that made the data
                opts["old_logps"] = mb.behaviour_logps.to(dev)
            if not self.need_token_kl and cfg.exact_kl:
                kl = token_kl_metric(h.detach(), self.module.get_output_embeddings(), ref_h,
                                     self._ref_head(), chunk=cfg.logprob_chunk, temperature=self.temperature)
            loss, m = self._loss(logps, ref_lp.to(dev), mask, mb, opts)
            m = dict(m)
            m["loss"] = loss.detach()  # the surrogate whose gradient is applied (the sum of the loss_* parts)
            m["log_ratio"] = m.pop("log_ratio_mean")  # mean sequence log pi(y)/pi_ref(y): a KL estimate on-policy only
            if kl is not None and cfg.exact_kl:
                # The one clamp of the reported KL, for both kinds: each position's KL is >= 0 up to
                # rounding, and at step 1 (pi == pi_ref) the loss's own token KL, unclamped for its
                # gradient, summed to -1.7e-7 a sequence in CI's kl_pg driver run.
                kl_rep = kl.detach().float().clamp_min(0.0)
                seq_kl = torch.zeros(mask.shape, dtype=torch.float32, device=dev).masked_scatter(mask, kl_rep).sum(-1)
                m["kl"] = seq_kl.mean()
            weight = mb.num_groups / len(groups)  # the batch loss is the mean over this rank's prompts
            if not torch.isfinite(loss):
                bad = True
                # Backpropagate NaN so the gradients are non-finite on purpose: the optimizer
                # guard (stage 0) or DeepSpeed's overflow check (stages 1-3) then skips the step
                # on every rank (gradients are all-reduced first), and nothing is applied.
                loss = sum(p.sum() for p in self.module.parameters() if p.requires_grad) * float("nan")
            self.engine.backward(loss * weight, scale_wrt_gas=False)  # weights sum to 1 over the batch
            times["policy_s"] += time.perf_counter() - t
            if mb is not mbs[-1]:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            for k, v in m.items():
                sums[k] += float(v) * weight
            ent_sum += float(ent.sum())
            ent_n += int(ent.numel())
            beh = mb.resp_mask & mb.has_behaviour[:, None]
            drift_sum += float(((logps.detach().float().cpu() - mb.behaviour_logps) * beh).sum())
            drift_n += int(beh.sum())
        t = time.perf_counter()
        self.engine.step()
        applied = self.engine.was_step_applied()
        self._value_step(applied)
        times["optimizer_s"] += time.perf_counter() - t
        if applied:
            self.version += 1
        else:
            self.skipped_batches += 1
            log.warning("learner: batch skipped (non-finite %s); %d skipped so far", "loss" if bad else "gradients", self.skipped_batches)
        tokens = sum(mb.num_response_tokens for mb in mbs)
        total = time.perf_counter() - t0
        out = dict(sums)
        out.update(
            skipped=float(not applied),
            skipped_total=float(self.skipped_batches),
            version=float(self.version),
            lr=lr,
            grad_norm=self._grad_norm(),
            entropy=ent_sum / max(ent_n, 1),
            policy_minus_behaviour_logp=drift_sum / drift_n if drift_n else float("nan"),  # drift of the data's sampler from pi
            response_tokens=float(tokens),
            tokens_per_s=tokens / total,
            wait_s=wait_s,
            step_s=total,
            **{k: float(v) for k, v in times.items()},
        )
        for prefix, ages in (("fresh_staleness", staleness), ("replay_age", replay_age)):
            st = [s for s in (ages or []) if s is not None]
            if st:
                out.update({f"{prefix}_mean": sum(st) / len(st), f"{prefix}_max": float(max(st))})
        if replay_fraction is not None:
            out["replay_fraction"] = float(replay_fraction)
        return out

    def _micro_batches(self, groups: Sequence[Group]) -> List[List[Group]]:
        """This rank's groups in micro-batches: ``micro_groups`` at a time, or by ``micro_tokens``
        (then as many on every rank: the most any rank needs)."""
        cfg = self.cfg
        if not cfg.micro_tokens:
            return [list(groups[s:s + cfg.micro_groups]) for s in range(0, len(groups), cfg.micro_groups)]
        chunks = split_by_tokens(groups, cfg.micro_tokens, cfg.pack, pack_tokens=cfg.pack_tokens, pad_multiple=cfg.pad_to_multiple_of)
        if self.world > 1:
            n = torch.tensor([len(chunks)], device=self.engine.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            chunks = split_to_count(chunks, int(n.item()))
        return chunks

    def _loss(self, logps, ref_lp, mask, mb: MicroBatch, opts: Dict[str, Any]):
        """The loss of one micro-batch: the mean over its prompts. Groups of different sizes
        (logged data) are scored per size class, each weighted by its share of the prompts."""
        cfg = self.cfg
        rewards = mb.rewards.to(logps.device)
        if mb.group_size:
            return self.loss_fn(logps, ref_lp, mask, rewards, group_size=mb.group_size, beta=cfg.beta, **opts)
        starts = [0]
        for n in mb.group_sizes:
            starts.append(starts[-1] + n)
        total, metrics = None, collections.defaultdict(float)
        for n in sorted(set(mb.group_sizes)):
            rows = [r for g, k in enumerate(mb.group_sizes) if k == n for r in range(starts[g], starts[g] + n)]
            idx = torch.tensor(rows, device=logps.device)
            sub = {k: (v.index_select(0, idx) if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == logps.shape[0] else v)
                   for k, v in opts.items()}
            loss, m = self.loss_fn(logps.index_select(0, idx), ref_lp.index_select(0, idx), mask.index_select(0, idx),
                                   rewards.index_select(0, idx), group_size=n, beta=cfg.beta, **sub)
            w = mb.group_sizes.count(n) / len(mb.group_sizes)
            total = loss * w if total is None else total + loss * w
            for k, v in m.items():
                metrics[k] = metrics[k] + v * w
        return total, dict(metrics)

    def _grad_norm(self) -> float:
        if isinstance(self.engine.optimizer, GuardedAdamW):
            return self.engine.optimizer.last_grad_norm
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ weights out

    def publish(self, copy: bool = True, adapters: bool = False) -> Tuple[int, Dict[str, torch.Tensor]]:
        """(version, a state dict of CPU tensors that share no memory with the engine).

        With LoRA the state dict has the adapters merged in (new tensors), or, ``adapters=True``
        (what the Ray actor sends the generators), only the adapters (``lora.publish_payload``:
        megabytes; each generator merges them over the base model it loaded).

        A copy, not ``detach()``: under ZeRO 1-2 the parameters are views into flat buffers, and a
        view kept in Ray's object store pins (and copies) the whole buffer. Under ZeRO 3 the
        partitions are gathered first. A tied weight appears under each of its names as one
        shared tensor (``save_pretrained`` handles that; safetensors' ``save_file`` wants a clone).

        ``copy=False``: a parameter that owns its whole storage (ZeRO 0 on CPU) is returned itself,
        detached, with no copy; the rest are copies as above. Valid only until the next
        ``train_step``: for a caller that copies at once (the Ray actor's ``ray.put``), which then
        needs no second copy of the weights in this process."""
        # Every name of a tied weight (lm_head.weight = embed_tokens.weight): vLLM's in-place
        # reload keeps a layer's old tensor when no weight arrives for it, which unties the
        # output head from the embedding it was tied to (a stale lm_head, measured in the
        # system tests as a policy/behaviour log-prob gap). One copy, shared by the names.
        params = list(self.module.named_parameters(remove_duplicate=False))
        unique = list({id(p): p for _, p in params}.values())

        def owned(t: torch.Tensor) -> bool:
            return (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
                    and t.untyped_storage().nbytes() == t.numel() * t.element_size())

        def one(t: torch.Tensor, may_share: bool) -> torch.Tensor:
            t = t.detach()
            return t if may_share and owned(t) else t.to("cpu", copy=True)

        def copy_all(may_share: bool):
            copies = {id(p): one(p, may_share) for p in unique}
            return {k: copies[id(p)] for k, p in params}

        if self.ref is None:  # LoRA (ZeRO 3 is refused with it): new tensors either way
            return self.version, (lora.publish_payload(self.module) if adapters else lora.merged_state_dict(self.module))
        if self.cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
                sd = copy_all(False)  # the gathered tensors are freed when the context ends
        else:
            sd = copy_all(not copy)
        persistent = self.module.state_dict().keys()  # non-persistent buffers are not weights
        for k, b in self.module.named_buffers():
            if k in persistent:
                sd[k] = one(b, not copy)
        return self.version, sd

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, root: str, *, extra: Optional[Dict[str, Any]] = None) -> str:
        """Write checkpoint ``step_{version:08d}`` under ``root`` atomically and point ``root/latest`` at it.

        Contents: ``hf/`` (safetensors, the policy's tokenizer files and chat template, a model
        card built from ``extra["card"]``: ``from_pretrained`` and vLLM load it), ``ds/`` (DeepSpeed
        module, optimizer state per rank), ``rng_rank{r}.pt``, ``meta.json`` (version, skipped
        count, config, the caller's ``extra``: e.g. the buffer cursor). ``root`` is a local (or
        shared) folder, or a URI of ``agro_dist.io.storage``. Local: written in a temporary folder and
        renamed once complete. Remote: each rank writes its files in a local temporary folder and
        uploads them; rank 0 then writes the manifest and ``latest``. Either way a crash never
        leaves a half checkpoint behind ``latest``, and a write that fails (a full disk) raises
        ``CheckpointWriteError`` on every rank with the previous checkpoint untouched.
        Collective: every rank calls it.
        """
        name = f"step_{self.version:08d}"
        remote = is_remote(root)
        if remote:  # this rank's files, uploaded below
            tmp = tempfile.mkdtemp(prefix=f"agro_dist-{name}-rank{self.rank}-")
        else:
            tmp = os.path.join(root, f".tmp-{name}")
        err: Optional[BaseException] = None
        if self.rank == 0:
            try:
                if remote:
                    Storage(root).delete(name)  # a partial upload of this step by a killed job
                else:
                    os.makedirs(root, exist_ok=True)
                    shutil.rmtree(tmp, ignore_errors=True)
                    os.makedirs(tmp)
            except Exception as e:  # noqa: BLE001 (torch.save reports a full disk as RuntimeError)
                err = e
        if not self._all_ok(err is None):
            return self._checkpoint_failed(root, name, tmp, remote, err)
        try:
            # LoRA: the frozen base is not saved again (it is the model folder, and hf/ holds the merge).
            self.engine.save_checkpoint(tmp, tag="ds", save_latest=False, exclude_frozen_parameters=self.ref is None)
            torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{self.rank}.pt"))
            if self.value_head is not None and self.rank == 0:  # the same on every rank
                torch.save({"head": self.value_head.state_dict(), "opt": self.value_opt.state_dict()}, os.path.join(tmp, "value_head.pt"))
        except Exception as e:  # noqa: BLE001
            err = e
        version, sd = self.publish()  # collective under ZeRO 3: every rank takes part, failed or not
        if self.rank == 0 and err is None:
            try:
                hf = os.path.join(tmp, "hf")
                if self.ref is None:  # LoRA: hf/ merged (transformers and vLLM alone load it), adapter/ for peft
                    self.module.get_base_model().save_pretrained(hf, state_dict=sd, safe_serialization=True)
                    self.module.save_pretrained(os.path.join(tmp, "adapter"), safe_serialization=True)
                else:
                    self.module.save_pretrained(hf, state_dict=sd, safe_serialization=True)
                # A folder usable on its own: the run's tokenizer and chat template, and a model card.
                copy_tokenizer(self.model_path, hf)
                write_model_card(hf, self._card((extra or {}).get("card")))
                meta = dict(version=self.version, skipped_batches=self.skipped_batches, world_size=self.world,
                            config=asdict(self.cfg), extra=extra or {}, time=time.time())
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(meta, f, indent=1, default=str)
            except Exception as e:  # noqa: BLE001
                err = e
        del sd
        if not self._all_ok(err is None):
            return self._checkpoint_failed(root, name, tmp, remote, err)
        if remote:
            uploaded: Dict[str, int] = {}
            try:
                uploaded = Storage(root).upload(tmp, name)
            except Exception as e:  # noqa: BLE001
                err = e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            everyone: List[Optional[Dict[str, int]]] = [None] * self.world
            dist.all_gather_object(everyone, uploaded if err is None else None)
            if any(u is None for u in everyone):
                return self._checkpoint_failed(root, name, tmp, remote, err)
            if self.rank == 0:
                try:
                    commit_checkpoint(root, name, {k: v for u in everyone for k, v in u.items()})
                except Exception as e:  # noqa: BLE001
                    err = e
        elif self.rank == 0:
            try:
                _fsync_tree(tmp)
                final = os.path.join(root, name)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.rename(tmp, final)
                atomic_write(os.path.join(root, "latest"), name)
            except Exception as e:  # noqa: BLE001
                err = e
        if not self._all_ok(err is None):
            return self._checkpoint_failed(root, name, tmp, remote, err)
        return join(root, name)

    def _all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (a collective: every rank calls it)."""
        if self.world == 1:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def _checkpoint_failed(self, root: str, name: str, tmp: str, remote: bool, err: Optional[BaseException]) -> str:
        if remote or self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial copy (local); a remote partial upload is not behind latest
        try:
            prev = latest_checkpoint(root)
        except OSError:
            prev = None
        why = f"{type(err).__name__}: {err}" if err is not None else "another rank failed to write its part"
        if not remote:  # torch.save reports a full disk as a zip "unexpected pos": say how much room there is
            try:
                why += f"; {shutil.disk_usage(root).free / 2**20:.1f} MB free on its disk"
            except OSError:
                pass
        raise CheckpointWriteError(
            f"checkpoint {name} could not be written to {display(root)} ({why}); "
            + (f"the previous checkpoint {prev} is intact" if prev else "there is no earlier checkpoint"))

    def _card(self, card: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        c = self.cfg
        lora_card = dict(rank=c.lora_rank, alpha=c.lora_alpha or 2 * c.lora_rank, targets=list(c.lora_targets or [])) if c.lora_rank else None
        return dict(dict(base_model=c.model, loss=c.loss, loss_options=c.loss_options, beta=c.beta, lr=c.lr, steps=self.version, lora=lora_card),
                    **(card or {}))

    def update_model_card(self, root: str, card: Dict[str, Any]) -> Optional[str]:
        """Rewrite the model card of ``root``'s latest checkpoint (e.g. with the final held-out
        accuracy, measured after it was written). Rank 0 only; others return None."""
        if self.rank != 0:
            return None
        name = latest_checkpoint(root)
        if not is_remote(root):
            return write_model_card(os.path.join(root, name, "hf"), self._card(card))
        st = Storage(root)
        local = tempfile.mkdtemp(prefix="agro_dist-card-")
        try:
            write_model_card(local, self._card(card))
            sent = st.upload(local, f"{name}/hf")
            manifest = json.loads(st.read_text(f"{name}/manifest.json"))["files"]
            manifest["hf/README.md"] = sent["README.md"]
            commit_checkpoint(root, name, manifest)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return join(root, name, "hf", "README.md")

    def load_checkpoint(self, path: str) -> Dict[str, Any]:
        """Resume from a checkpoint folder, or from ``root`` (its ``latest``); returns meta.
        A remote ``root`` (a URI): its latest checkpoint, checked against its manifest, is
        downloaded to a local temporary folder first."""
        if is_remote(path):
            local, _ = fetch_checkpoint(path)
            try:
                return self._load_checkpoint(local)
            finally:
                shutil.rmtree(local, ignore_errors=True)
        latest = os.path.join(path, "latest")
        if os.path.exists(latest):
            with open(latest) as f:
                path = os.path.join(path, f.read().strip())
        return self._load_checkpoint(path)

    def _load_checkpoint(self, path: str) -> Dict[str, Any]:
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise FileNotFoundError(f"no complete checkpoint at {path}")
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta["world_size"] != self.world:
            raise ValueError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {self.world}")
        load_path, _ = self.engine.load_checkpoint(path, tag="ds", load_optimizer_states=True, load_lr_scheduler_states=False,
                                                   load_module_strict=self.ref is not None)  # LoRA: the adapters alone were saved
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {path}/ds")
        _set_rng_state(_load_rng(os.path.join(path, f"rng_rank{self.rank}.pt")))
        if self.value_head is not None:
            vh = os.path.join(path, "value_head.pt")
            if not os.path.exists(vh):
                raise FileNotFoundError(f"checkpoint {path} has no value head (value_head.pt): it was not written by an agro_single run")
            state = torch.load(vh, weights_only=True, map_location=self.engine.device)
            self.value_head.load_state_dict(state["head"])
            self.value_opt.load_state_dict(state["opt"])
        self.version = int(meta["version"])
        self.skipped_batches = int(meta["skipped_batches"])
        self._ref_cache.clear()
        return meta


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _rng_state() -> Dict[str, Any]:
    """The RNG states as tensors and plain numbers only, so that ``torch.load(weights_only=True)``
    reads them back: checkpoints may come from shared or remote storage, and a pickle from there
    could run code."""
    import random

    import numpy as np

    py_version, py_state, py_gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
         "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                   "cached": float(cached)},
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _load_rng(path: str) -> Optional[Dict[str, Any]]:
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        # Checkpoints written before the RNG states were plain tensors (numpy arrays inside):
        # not unpickled from storage; the run resumes, its random streams start afresh.
        log.warning("learner: %s is in the old pickled format, not loaded (weights_only); random streams start afresh, so this "
                    "resume is not bit-exact", path)
        return None


def _set_rng_state(s: Optional[Dict[str, Any]]) -> None:
    import random

    import numpy as np

    if s is None:
        return
    py = s["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())


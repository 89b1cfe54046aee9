"""The learner's settings (the ``learner`` section of a run's config), apart from the learner itself
so that reading a config (the driver, ``--help``) does not import torch, DeepSpeed or transformers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

# How a micro-batch meets the model (batching.py; measured in docs/learner.md).
PACKINGS = ("prefix", "rows", "none")


@dataclass
class LearnerConfig:
    model: str  # a Hugging Face causal-LM folder, or "default" (SmolLM2-135M-Instruct)
    ref_model: Optional[str] = None  # default: the same folder as model
    loss: str = "agro_off"
    loss_options: Dict[str, Any] = field(default_factory=dict)
    beta: float = 0.05
    # The policy (and the reference) are scored as softmax(logits / temperature): the distribution
    # a generator sampling at this temperature draws from. None: 1 here; a run's driver sets the
    # generators' temperature (agro_dist.run.config), so that on-policy data is on-policy.
    temperature: Optional[float] = None
    batch_groups: int = 8  # groups per optimizer step, over all ranks
    micro_groups: int = 2  # groups per forward/backward on one rank
    # > 0: micro-batches sized by tokens instead: consecutive groups while the tokens the layout
    # puts through the model (padding included, batching.micro_batch_tokens) stay within this
    # budget, one group at least; micro_groups is then unused. ZeRO 0-2.
    micro_tokens: int = 0
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    lr_schedule: str = "constant"  # "constant" or "cosine" (to min_lr_ratio * lr at total_steps)
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.0
    zero_stage: int = 0
    offload_optimizer: bool = False
    dtype: str = "float32"  # "bfloat16" on GPU; float32 on CPU (bf16 trains ~25x slower there)
    logprob_chunk: int = 1024  # positions per chunk of vocabulary logits
    pad_to_multiple_of: int = 1
    # How a micro-batch meets the model (batching.py; measured in docs/learner.md):
    # "prefix": each prompt once, then the completions as rows over its keys and values;
    # "rows": each group once as [prompt, c_1, ..., c_n] under a 4-D mask, groups packed into rows
    # of at most pack_tokens tokens (no padding, but attention over the whole row);
    # "none": one padded row per completion, the prompt computed n times (the reference).
    pack: str = "prefix"
    pack_tokens: int = 1024
    ref_cache_groups: int = 4096
    gradient_checkpointing: bool = False
    # Report the exact KL(pi || pi_ref) (full vocabulary, per response position, summed per
    # sequence): right off-policy too. Costs a reference forward for replayed groups as well
    # (their cached reference log-probs would otherwise spare it) and two vocabulary projections
    # per response token. Off: ``kl`` is not reported (the sampled ``log_ratio`` still is).
    exact_kl: bool = True
    # agro_single's value head V(x) (a linear map of the policy's detached hidden state at the
    # prompt's last token) has its own AdamW at this learning rate: it must track the scale of
    # the regularised reward within tens of steps, which the policy's lr (1e-5) would not do.
    value_lr: float = 1e-2
    # LoRA adapters through peft (0: full fine-tuning). The reference is then the base model with
    # the adapters disabled: no second copy of the weights. lora_targets empty: every linear
    # layer of the attention and MLP blocks (peft's "all-linear", lm_head excluded).
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: 2 x lora_rank
    lora_dropout: float = 0.0
    lora_targets: List[str] = field(default_factory=list)
    seed: int = 0
    deepspeed: Dict[str, Any] = field(default_factory=dict)  # merged over the generated config

"""LoRA for the learner (``learner.lora_rank`` > 0): adapters through peft on the policy, the
reference as the same model with its adapters disabled, and the weights the generators and the
``hf/`` checkpoint need as plain Hugging Face names with the adapters merged in.

Nothing here changes the base weights: ``merged_state_dict`` computes ``W + scale * B @ A`` per
adapted layer into new tensors (peft's ``merge_and_unload`` would merge in place).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch

PREFIX = "base_model.model."  # what peft puts before the wrapped model's own names


def wrap(model: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets) -> torch.nn.Module:
    """The model with LoRA adapters (only they train); peft's "all-linear" without targets."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                     target_modules=list(targets) if targets else "all-linear")
    return get_peft_model(model, cfg)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """The base model, exactly: peft's adapters are skipped (the reference pass)."""
    with model.disable_adapter():
        yield


def _hf_name(name: str) -> str:
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The policy's weights under the base model's own names, adapters merged (new tensors on the
    CPU; the tied output head under each of its names, as ``Learner.publish``)."""
    from peft.tuners.lora import LoraLayer

    out: Dict[str, torch.Tensor] = {}
    lora_names = set()
    for mname, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            w = module.base_layer.weight.detach().to("cpu", copy=True)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    w += module.get_delta_weight(adapter).detach().to("cpu", dtype=w.dtype)
            out[_hf_name(mname) + ".weight"] = w
            lora_names.add(mname)
            if getattr(module.base_layer, "bias", None) is not None:
                out[_hf_name(mname) + ".bias"] = module.base_layer.bias.detach().to("cpu", copy=True)
    copies: Dict[int, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".lora_" in name or any(name.startswith(m + ".") for m in lora_names):
            continue
        key = _hf_name(name)
        if id(p) not in copies:
            copies[id(p)] = p.detach().to("cpu", copy=True)
        out[key] = copies[id(p)]
    return out


def adapter_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The adapters alone (what changes in training), as peft saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


@torch.no_grad()
def publish_payload(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """What a publish sends the generators: per adapted layer, under the base model's module name
    ``m``, ``m.lora_A`` [r, in], ``m.lora_B`` [out, r] and ``m.lora_scale`` (a 0-d tensor), from
    which ``agro_dist.io.weights.merge_adapters`` rebuilds ``W + scale * B @ A`` over the base
    weights the generator already has on disk (megabytes instead of the model).

    Layers whose delta is not a plain ``B @ A`` (DoRA, GPT-2's transposed Conv1D) cannot be rebuilt
    that way: then the merged weights are sent whole (``merged_state_dict``)."""
    from peft.tuners.lora import LoraLayer

    out: Dict[str, torch.Tensor] = {}
    for mname, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and hasattr(module, "base_layer")):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            plain = (not getattr(module, "fan_in_fan_out", False) and not module.use_dora.get(adapter, False)
                     and isinstance(module.lora_A[adapter], torch.nn.Linear) and len(module.active_adapters) == 1)
            if not plain:
                return merged_state_dict(model)
            name = _hf_name(mname)
            out[name + ".lora_A"] = module.lora_A[adapter].weight.detach().to("cpu", copy=True)
            out[name + ".lora_B"] = module.lora_B[adapter].weight.detach().to("cpu", copy=True)
            out[name + ".lora_scale"] = torch.tensor(float(module.scaling[adapter]))
    return out

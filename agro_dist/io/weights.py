"""Published weights as they travel through Ray's object store: numpy byte views, not pickled tensors.

Ray pickles a torch tensor through ``torch.save`` into an in-memory bytes object: the learner
builds a second copy of the weights before the store's copy, and each generator a bytes copy
plus the tensors ``torch.load`` makes from it (measured with SmolLM2-135M: ~0.54 GB each, per
publish). A numpy array instead travels as a pickle-5 out-of-band buffer: ``ray.put`` copies its
memory into the store once, and a reader on the same node gets an array over the store's shared
memory, no copy. ``pack`` turns a state dict into such arrays (a tensor under several names, a
tied embedding, travels once); ``unpack`` gives the tensors back, over the same memory (read-only:
the generator copies them into its engine). This is what Ray's own
``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`` does for every tensor of a process; here only the weights
take that path, and the driver never imports torch.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, Iterator, Mapping, Tuple

MARK = "__agro_weights__"  # the key that says a dict is a packed state dict


def pack(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """``{name: tensor}`` (CPU, contiguous) -> ``{MARK: 1, name: (uint8 array, dtype, shape)}``,
    each array a view of its tensor's memory (no copy). Keep the tensors alive until ``ray.put``
    returns (it copies them into the store)."""
    import torch

    out: Dict[str, Any] = {MARK: 1}
    views: Dict[int, Any] = {}
    for name, t in state_dict.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.detach().to("cpu").contiguous()
        if id(t) not in views:  # one array per tensor: pickle sends an object it has seen once
            views[id(t)] = t.detach().reshape(-1).view(torch.uint8).numpy()
        out[name] = (views[id(t)], str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return out


def is_packed(obj: Any) -> bool:
    return isinstance(obj, Mapping) and MARK in obj


def unpack(packed: Mapping[str, Any]) -> Dict[str, Any]:
    """The tensors of ``pack``'s output, over the arrays' memory (read-only shared memory when it
    came from the object store: copy before writing to them)."""
    import torch

    out: Dict[str, Any] = {}
    made: Dict[int, Any] = {}
    with warnings.catch_warnings():
        # torch warns that the store's read-only buffer is not writable; nothing writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, value in packed.items():
            if name == MARK:
                continue
            arr, dtype, shape = value
            if id(arr) not in made:
                made[id(arr)] = torch.from_numpy(arr).view(getattr(torch, dtype)).reshape(shape)
            out[name] = made[id(arr)]
    return out


LORA_SUFFIXES = (".lora_A", ".lora_B", ".lora_scale")


def is_adapters(weights: Mapping[str, Any]) -> bool:
    """Whether a (unpacked) publish holds LoRA adapters (``learner.lora.publish_payload``), not weights."""
    return any(k.endswith(".lora_A") for k in weights)


def merge_adapters(base: Iterable[Tuple[str, Any]], adapters: Mapping[str, Any]) -> Iterator[Tuple[str, Any]]:
    """The policy's weights, one ``(name, tensor)`` at a time, from the base model's (an iterator:
    ``(name, tensor)`` pairs read lazily, so that one tensor at a time is in memory) and a LoRA
    publish: for each adapted module ``m``, ``m.weight = base + (lora_B @ lora_A) * lora_scale``, as
    peft's ``get_delta_weight`` computes it, in float32 whatever the base file's dtype (a bfloat16
    file must not round the delta away; the engine casts on load); every other tensor is the
    base's, unchanged. An adapter whose weight the base lacks is an error (the generators must load
    the learner's base model)."""
    modules = {k[: -len(".lora_A")] for k in adapters if k.endswith(".lora_A")}
    merged = set()
    for name, w in base:
        m = name[: -len(".weight")] if name.endswith(".weight") else None
        if m in modules:
            A, B = adapters[m + ".lora_A"].float(), adapters[m + ".lora_B"].float()
            w = w.float() + (B @ A) * float(adapters[m + ".lora_scale"])
            merged.add(m)
        yield name, w
    if merged != modules:
        raise KeyError(f"LoRA adapters for {sorted(modules - merged)[:3]}..., whose weights the generator's base model lacks: "
                       "the generators must load the learner's base model")


def iter_safetensors(path: str) -> Iterator[Tuple[str, Any]]:
    """The tensors of a ``.safetensors`` file or a folder of them, read one at a time (memory-mapped:
    one tensor in memory at a time), for the generator's in-place reload from a folder and the LoRA
    merge over the base model at every publish. A tied output head is named too: ``save_pretrained``
    leaves ``lm_head.weight`` out when it is the embedding, and vLLM's in-place reload keeps a
    layer's old tensor when no weight arrives for it, so a folder loaded after a learner's publish
    left the published head in place (measured: log-probs 0.56 off the folder's model on the tiny
    test model)."""
    import glob
    import os

    from safetensors import safe_open

    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    names = set()
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                names.add(name)
                yield name, fh.get_tensor(name)
    if "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
        for f in files:
            with safe_open(f, framework="pt") as fh:
                if "model.embed_tokens.weight" in fh.keys():
                    yield "lm_head.weight", fh.get_tensor("model.embed_tokens.weight")

"""What makes an exported ``hf/`` folder usable on its own: the tokenizer files and chat template
the run used, copied verbatim from the policy's folder, and a short model card (``README.md``).

``AutoTokenizer.from_pretrained(folder)``, ``AutoModelForCausalLM.from_pretrained(folder)``,
``vllm serve folder`` and the Hub's model page then need nothing else.
"""

from __future__ import annotations

import datetime
import os
import shutil
from typing import Any, Dict, List, Optional, Union

# Everything a tokenizer (fast or slow, with its chat template) may be made of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tiktoken.model")
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def copy_tokenizer(src: str, dst: str) -> List[str]:
    """Copy the tokenizer files of model folder ``src`` into ``dst``; returns their names (none
    for a folder without a tokenizer, e.g. a test model)."""
    copied = []
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(dst, name))
            copied.append(name)
    return copied


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def model_card(*, base_model: str, loss: str, beta: float, steps: int, samples: Optional[int] = None,
               loss_options: Optional[Dict[str, Any]] = None, lr: Optional[float] = None, task: Optional[str] = None,
               task_path: Optional[str] = None, task_options: Optional[Dict[str, Any]] = None, mode: Optional[str] = None,
               replay_prob: Optional[Union[float, str]] = None, reward_fn: Optional[str] = None, before: Optional[Dict[str, float]] = None,
               after: Optional[Dict[str, float]] = None, lora: Optional[Dict[str, Any]] = None, **_ignored: Any) -> str:
    """A Hugging Face model card (YAML front matter + markdown) for a checkpoint."""
    base = DEFAULT_BASE if base_model in ("default", "smollm2-135m-instruct") else base_model
    opts = f" {loss_options}" if loss_options else ""
    data = task or "(unknown)"
    if task_path:
        data += f" from `{task_path}`"
    if task_options:
        data += f", options {task_options}"
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [agro_dist, agro, reinforcement-learning]",
        "---",
        "",
        f"# {os.path.basename(base.rstrip('/'))} fine-tuned with AGRO (agro_dist)",
        "",
        f"- **Base model:** `{base}`",
        f"- **Loss:** `{loss}`{opts}, beta = {beta:g}" + (f", lr = {lr:g}" if lr is not None else ""),
        f"- **Training:** {steps} optimizer steps" + (f", {samples} completions" if samples is not None else "")
        + (f", {mode} mode" if mode else "") + (f", replay ratio {replay_prob:g}" if isinstance(replay_prob, (int, float)) and replay_prob
           else f", replay ratio {replay_prob}" if replay_prob else ""),
        f"- **Data:** {data}" + (f"; reward `{reward_fn}`" if reward_fn else ""),
    ]
    if lora:
        targets = ", ".join(lora.get("targets") or []) or "every linear layer but the output head"
        lines.append(f"- **LoRA:** rank {lora['rank']}, alpha {lora['alpha']:g} on {targets}; merged into these weights "
                     "(a full model). The adapters alone are in `../adapter/` (`peft.PeftModel.from_pretrained(base, folder)`).")
    if after or before:
        ref = after or before
        lines += ["", f"Held-out accuracy ({int(ref.get('eval_problems', 0))} problems; sampled at the training temperature):", "",
                  "| | greedy | sampled |", "|---|---|---|"]
        if before:
            lines.append(f"| before (version {int(before.get('version', 0))}) | {_pct(before.get('greedy_accuracy'))} | "
                         f"{_pct(before.get('sampled_accuracy'))} |")
        if after:
            v = int(after.get("version", steps))
            label = "this checkpoint" if v == steps else "latest evaluation"
            lines.append(f"| {label} (version {v}) | {_pct(after.get('greedy_accuracy'))} | {_pct(after.get('sampled_accuracy'))} |")
    lines += ["", "The folder holds the tokenizer and chat template the run used: `AutoTokenizer` / `AutoModelForCausalLM`",
              "`.from_pretrained(folder)` and `vllm serve folder` load it as it is. Evaluate it (or its base) with",
              "`python -m agro_dist.evaluate --model FOLDER --task TASK`.", "",
              f"Written by agro_dist on {datetime.date.today().isoformat()}.", ""]
    return "\n".join(lines)


def run_facts(cfg, eval_rows: List[Dict[str, Any]], samples: int, logged_groups: int = 0) -> Dict[str, Any]:
    """What a run's checkpoint card says about the run (the learner adds loss, beta, steps): the
    model, the task (offline: the logged file, evaluated on the task), the mode and p, the
    completions trained, and the held-out accuracy before and (once measured) after."""
    g, r = cfg.generator, cfg.run
    evals = [{k: e[k] for k in ("version", "greedy_accuracy", "sampled_accuracy", "eval_problems")} for e in eval_rows]
    task, task_path, task_options = g.task, g.task_path, g.task_options
    if r.mode == "offline":  # trained on a file; the task is what it is evaluated on
        task, task_path, task_options = f"logged generations `{cfg.data.path}` ({logged_groups} groups; evaluated on {g.task})", None, {}
    return dict(base_model=cfg.model, task=task, task_path=task_path, task_options=task_options, reward_fn=g.reward_fn, mode=r.mode,
                replay_prob=r.replay_prob, samples=samples, before=evals[0] if evals else None,
                after=evals[-1] if len(evals) > 1 else None)


def write_model_card(folder: str, card: Dict[str, Any]) -> str:
    """Write (or replace, atomically) ``folder/README.md``."""
    path = os.path.join(folder, "README.md")
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(model_card(**card))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

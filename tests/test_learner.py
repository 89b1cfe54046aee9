"""The DeepSpeed learner on a tiny random-init Llama (CPU, gloo): log-probs, batching, the
update against a plain PyTorch loop, padding invariance, NaN skipping, publishing, checkpoints,
2 ranks under torchrun, and resume after kill -9."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from agro_dist.core.losses import LOSSES, get_loss
from agro_dist.learner.batching import collate, micro_batch_tokens, split_by_tokens, split_to_count
from agro_dist.learner.learner import LearnerConfig, lr_at, response_hidden
from agro_dist.learner.logprobs import chunked_logprobs, naive_logprobs, token_kl
from learner_worker import batch_for_step, make_learner

HERE = os.path.dirname(__file__)


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunk,temperature", [(1, 1.0), (7, 1.0), (64, 1.0), (4096, 1.0), (7, 0.7), (4096, 1.6)])
def test_chunked_logprobs_equal_naive_values_gradients_entropy(chunk, temperature):
    """Values, gradients in h and W, and the entropy of softmax(h W^T / T) against full logits
    (T 0.7: the default sampling temperature, which the learner scores at)."""
    g = torch.Generator().manual_seed(1)
    N, H, V = 97, 24, 300
    h = torch.randn(N, H, generator=g).requires_grad_(True)
    W = torch.randn(V, H, generator=g).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    w = torch.randn(N, generator=g)
    lp, ent = chunked_logprobs(h, W, y, chunk=chunk, entropy=True, temperature=temperature)
    ref = naive_logprobs(h, W, y, temperature)
    assert (lp - ref).abs().max() < 1e-5
    g1 = torch.autograd.grad((lp * w).sum(), (h, W))
    g2 = torch.autograd.grad((ref * w).sum(), (h, W))
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() < 1e-5 * max(1.0, b.abs().max().item())
    # Entropy (a metric) against float64: float32 rounding grows with |logits| (~20 here).
    full = torch.log_softmax(h.detach().double() @ W.detach().double().T / temperature, -1)
    assert (ent.double() - -(full.exp() * full).sum(-1)).abs().max() < 1e-4


def test_zero3_module_path_gives_the_same_tempered_logprobs_and_gradients():
    """ZeRO 3 calls the output module per chunk (module_chunked_logprobs): the same values and
    gradients as the full logits at T 0.7."""
    from agro_dist.learner.logprobs import module_chunked_logprobs

    g = torch.Generator().manual_seed(3)
    h = torch.randn(41, 16, generator=g).requires_grad_(True)
    head = torch.nn.Linear(16, 90, bias=False)
    y = torch.randint(0, 90, (41,), generator=g)
    lp, ent = module_chunked_logprobs(h, head, y, chunk=8, entropy=True, temperature=0.7)
    ref = naive_logprobs(h, head.weight, y, 0.7)
    assert (lp - ref).abs().max() < 1e-5
    a = torch.autograd.grad(lp.sum(), (h, head.weight))
    b = torch.autograd.grad(ref.sum(), (h, head.weight))
    assert all((x - z).abs().max() < 1e-5 for x, z in zip(a, b))
    full = torch.log_softmax(h.detach() @ head.weight.detach().T / 0.7, -1)
    assert (ent - -(full.exp() * full).sum(-1)).abs().max() < 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_kl_matches_full_vocabulary_kl(temperature):
    g = torch.Generator().manual_seed(2)
    h, hr = torch.randn(10, 8, generator=g).requires_grad_(True), torch.randn(10, 8, generator=g)
    W, Wr = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    kl = token_kl(h, W, hr, Wr, chunk=3, temperature=temperature)
    p, q = torch.log_softmax(h @ W.T / temperature, -1), torch.log_softmax(hr @ Wr.T / temperature, -1)
    ref = (p.exp() * (p - q)).sum(-1)
    assert (kl - ref).abs().max() < 1e-5
    # The gradients reach ~5 here: float32 sums in another order (chunks of 3 against the whole
    # vocabulary; oneDNN's kernels depend on the threads it has) differ by a few ulps *of that
    # size*: 1.07e-5 once here beside a training run. Relative 1e-5 is ~80 ulps; a wrong gradient is off by O(1).
    torch.testing.assert_close(torch.autograd.grad(kl.sum(), h)[0], torch.autograd.grad(ref.sum(), h)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- batching


def test_collate_places_responses_at_their_target_positions():
    groups = batch_for_step(0, 2)
    mb = collate(groups, pad_multiple=8)
    assert mb.input_ids.shape[1] % 8 == 0 and mb.num_rows == 8 and mb.group_size == 4
    r = 0
    for g in groups:
        P = len(g.prompt_token_ids)
        for c in g.completions:
            T = len(c.token_ids)
            targets = mb.input_ids[r, 1:][mb.resp_mask[r]]
            assert targets.tolist() == list(c.token_ids)
            assert mb.resp_mask[r].nonzero().flatten().tolist() == list(range(P - 1, P - 1 + T))
            assert mb.attention_mask[r].sum() == P + T
            assert torch.allclose(mb.behaviour_logps[r][mb.resp_mask[r]], torch.as_tensor(c.logprobs))
            r += 1
    mixed = batch_for_step(1, 2)
    mixed[1].completions.pop()  # logged data: groups of different sizes
    mb = collate(mixed)
    assert mb.group_sizes == [4, 3] and mb.group_size == 0 and mb.num_rows == 7


def _packed_and_padded_logprobs(model_path, groups, pack, budget=1024, pad_multiple=1):
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    W = model.get_output_embeddings().weight
    out = []
    for p in ("none", pack):
        mb = collate(groups, pad_multiple=pad_multiple, pack=p, pack_tokens=budget)
        with torch.no_grad():
            h = response_hidden(model, mb, torch.device("cpu"))
            out.append(naive_logprobs(h, W, mb.input_ids[:, 1:][mb.resp_mask]))
    return out, mb


def _mixed_groups():
    groups = batch_for_step(4, 4)
    del groups[1].completions[2:]  # groups of different sizes
    c = groups[2].completions[0]
    c.token_ids, c.logprobs = c.token_ids[:1], c.logprobs[:1]  # a one-token completion
    groups[0].prompt_token_ids = groups[0].prompt_token_ids + [5, 6, 7, 8, 9]
    return groups


def test_prefix_layout_gives_every_response_token_its_padded_log_prob(tiny_model):
    """Each prompt once, its keys and values shared by its completions' rows: the same log-probs as
    one padded row per completion (prompts of different lengths, groups of different sizes, a
    one-token completion). Tolerance: float32 attention over another key layout changes the
    summation order only: ~1e-7 x |log p|; 1e-5 absolute for |log p| < 10 here."""
    groups = _mixed_groups()
    (padded, packed), mb = _packed_and_padded_logprobs(tiny_model, groups, "prefix", pad_multiple=8)
    pf = mb.packed
    assert pf.prompt_ids.shape == (4, 16) and pf.ids.shape == (mb.num_rows, 16)  # padded to multiples of 8
    assert pf.row_group.tolist() == [0] * 4 + [1] * 2 + [2] * 4 + [3] * 4
    assert pf.src.numel() == mb.num_response_tokens == padded.numel()
    diff = (packed - padded).abs().max().item()
    print(f"\nprefix: max |log-prob difference| {diff:.1e}")
    assert diff < 1e-5


@pytest.mark.parametrize("budget", [1, 28, 10_000])
def test_packed_rows_give_every_response_token_its_padded_log_prob(tiny_model, budget):
    """Each group once as [prompt, c_1, ..., c_n], completions attending to the prompt and causally
    to themselves: the same log-probs as one padded row per completion. Budget 1: a row per group;
    28: a group longer than the budget alone, then a row of two groups; 10,000: one row. Tolerance
    as for the prefix layout."""
    groups = _mixed_groups()
    (padded, packed), mb = _packed_and_padded_logprobs(tiny_model, groups, "rows", budget, pad_multiple=8)
    pk = mb.packed
    assert pk.input_ids.shape[0] == {1: 4, 28: 3, 10_000: 1}[budget]
    assert pk.input_ids.shape[1] % 8 == 0
    sizes = [len(g.prompt_token_ids) + g.num_tokens() for g in groups]
    distinct = sum(sizes)
    assert sizes == [30, 13, 15, 15]
    assert int((pk.attention_mask[:, 0].diagonal(dim1=-2, dim2=-1) & (pk.input_ids != 0)).sum()) <= distinct
    assert pk.src.numel() == mb.num_response_tokens == padded.numel()
    diff = (packed - padded).abs().max().item()
    print(f"\nbudget {budget}: {pk.input_ids.shape[0]} row(s) of {pk.input_ids.shape[1]}, max |log-prob difference| {diff:.1e}")
    assert diff < 1e-5


@pytest.mark.parametrize("pack", ["prefix", "rows"])
def test_packed_log_probs_on_the_default_model(pack):
    """SmolLM2 (30 layers, a real tokenizer's ids): packed equals padded. Measured 1.9e-5 (rows)
    and 2.7e-5 (prefix): the rounding differences grow through 30 layers and logits of ~20; a
    layout bug (a completion seeing another, a wrong position id) moves log-probs by >1e-2."""
    from agro_dist.io.models import resolve_model

    groups = batch_for_step(5, 3, vocab=40_000)
    (padded, packed), _ = _packed_and_padded_logprobs(resolve_model("default"), groups, pack, 64)
    diff = (packed - padded).abs().max().item()
    print(f"\nSmolLM2, {pack}: {padded.numel()} response tokens, max |log-prob difference| {diff:.1e}")
    assert diff < 1e-4


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_packed_layouts_give_the_padded_update_for_every_loss(tiny_model, loss):
    """Two steps, the second on the first's groups again (replayed: cached reference log-probs),
    groups of different sizes; rows: rows of several groups and groups longer than the row. Both
    packed learners' weights equal the padded learner's (adam_eps = 1e-4 and the 1e-6 tolerance
    as in test_learner_steps_equal_a_plain_pytorch_loop, which runs the default layout, prefix,
    under ZeRO 0-3 and offload)."""
    batch = batch_for_step(6, 4)
    for g, n in zip(batch, (4, 3, 2, 3)):
        del g.completions[n:]
    got = {}
    for pack in ("none", "prefix", "rows"):
        learner = make_learner(tiny_model, loss=loss, adam_eps=1e-4, pack=pack, pack_tokens=28, **({"value_lr": 0.1} if loss == "agro_single" else {}))
        for _ in range(2):
            assert learner.train_step(batch)["skipped"] == 0
        got[pack] = learner.publish()[1]
    for pack in ("prefix", "rows"):
        diff = max((got[pack][k] - got["none"][k]).abs().max().item() for k in got["none"])
        print(f"\n{loss}: {pack} vs padded, max parameter difference {diff:.1e}")
        assert diff < 1e-6


def test_gradient_checkpointing_with_packed_rows_gives_the_padded_update(tiny_model):
    """deploy/gpu.yaml's layout: rows (prefix needs the prompts' keys and values, which checkpointing drops)."""
    batch = batch_for_step(7, 4)
    got = []
    for kw in (dict(pack="none"), dict(pack="rows", gradient_checkpointing=True)):
        learner = make_learner(tiny_model, adam_eps=1e-4, **kw)
        assert learner.train_step(batch)["skipped"] == 0
        got.append(learner.publish()[1])
    assert max((got[0][k] - got[1][k]).abs().max().item() for k in got[0]) < 1e-6
    with pytest.raises(ValueError, match="use pack 'rows'"):
        make_learner(tiny_model, gradient_checkpointing=True)


@pytest.mark.parametrize("loss", ["agro_off", "rloo"])
def test_groups_of_different_sizes_train_on_the_mean_over_prompts(tiny_model, loss):
    """Mixed sizes in one micro-batch (scored per size class, weighted by prompts) equal each group's
    loss alone, averaged over the batch's prompts (the plain loop with one group per micro-batch)."""
    batches = [batch_for_step(s, 4) for s in range(2)]
    for b in batches:
        for g, n in zip(b, (4, 3, 2, 3)):
            del g.completions[n:]
    learner = make_learner(tiny_model, loss=loss, micro_groups=2, adam_eps=1e-4)
    for b in batches:
        assert learner.train_step(b)["skipped"] == 0
    _, got = learner.publish()
    want = plain_pytorch_steps(tiny_model, batches, loss=loss, micro_groups=1)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    assert diff < 1e-6, diff
    # A group of one completion has no leave-one-out baseline: refused by the losses that need one.
    short = batch_for_step(2, 4)
    del short[0].completions[1:]
    with pytest.raises(ValueError, match="needs groups of >= 2"):
        learner.train_step(short)


# ----------------------------------------------------------------------------- the update


def plain_pytorch_steps(model_path, steps, *, lr=1e-2, beta=0.1, wd=0.01, clip=1.0, eps=1e-4, loss="agro_off", micro_groups=2):
    """The reference: HF model, full-vocabulary logits, the registry loss, torch AdamW."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=eps)
    fn = get_loss(loss)
    for step, groups in enumerate(steps):
        opt.zero_grad()
        for s in range(0, len(groups), micro_groups):
            mb = collate(groups[s:s + micro_groups])

            def lp(m):
                logits = m(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
                full = torch.log_softmax(logits, -1).gather(2, mb.input_ids[:, 1:, None]).squeeze(2)
                return torch.where(mb.resp_mask, full, 0.0)

            with torch.no_grad():
                ref_lp = lp(ref)
            out, _ = fn(lp(model), ref_lp, mb.resp_mask, mb.rewards, group_size=mb.group_size, beta=beta)
            (out * mb.num_groups / len(groups)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("zero,micro_groups,offload", [(0, 2, False), (1, 2, False), (2, 2, False), (2, 2, True), (3, 4, False)])
def test_learner_steps_equal_a_plain_pytorch_loop(tiny_model, zero, micro_groups, offload):
    """Two steps, ZeRO 0 and 2, against HF + full logits + torch AdamW.

    Tolerance: the gradients agree to ~3e-7 relative (float32: chunked vs full log-softmax,
    reduction order). Adam turns a gradient near its eps into an update of size ~lr whatever
    its magnitude, so with eps = 1e-8 float noise in a 1e-8 gradient moves a weight by ~1e-5;
    both runs use eps = 1e-4, which bounds d(update)/d(gradient) by lr/eps = 100, and a 1e-6
    parameter tolerance is then meaningful (a real bug moves weights by ~lr = 1e-2)."""
    batches = [batch_for_step(s, 4) for s in range(2)]
    learner = make_learner(tiny_model, zero_stage=zero, micro_groups=micro_groups, offload_optimizer=offload, adam_eps=1e-4)
    before = {k: v.clone() for k, v in learner.publish()[1].items()}
    for b in batches:
        m = learner.train_step(b)
        assert m["skipped"] == 0
    _, got = learner.publish()
    want = plain_pytorch_steps(tiny_model, batches)
    moved = max((want[k] - before[k]).abs().max().item() for k in want)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"\nZeRO {zero} (offload {offload}): largest parameter change {moved:.3e}, largest difference from plain PyTorch {diff:.3e}")
    assert moved > 1e-3  # the steps did something
    assert diff < 1e-6


def test_padding_and_micro_batch_layout_do_not_change_the_update(tiny_model):
    """Groups of unequal lengths split differently and padded differently: the same update
    (adam_eps = 1e-4 for the reason given in the test above)."""
    batch = batch_for_step(3, 4)
    a = make_learner(tiny_model, micro_groups=2, pad_to_multiple_of=1, adam_eps=1e-4)
    b = make_learner(tiny_model, micro_groups=1, pad_to_multiple_of=48, adam_eps=1e-4)
    a.train_step(batch)
    b.train_step(batch)
    pa, pb = a.publish()[1], b.publish()[1]
    diff = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    print(f"\nmicro_groups 2 / no extra padding vs micro_groups 1 / padded to 48: max difference {diff:.2e}")
    assert diff < 1e-6


def test_micro_batch_tokens_are_what_each_layout_puts_through_the_model():
    groups = batch_for_step(0, 4)
    for k in (1, 2, 4):
        for pack in ("none", "prefix", "rows"):
            for pack_tokens, pad_multiple in ((10**6, 1), (60, 1), (60, 8)):  # rows: one row, or several; padded to 8
                mb = collate(groups[:k], pack=pack, pack_tokens=pack_tokens, pad_multiple=pad_multiple)
                computed = {"none": lambda: mb.input_ids.numel(),
                            "prefix": lambda: mb.packed.prompt_ids.numel() + mb.packed.ids.numel(),
                            "rows": lambda: mb.packed.input_ids.numel()}[pack]()
                assert micro_batch_tokens(groups[:k], pack, pack_tokens=pack_tokens, pad_multiple=pad_multiple) == computed, \
                    (k, pack, pack_tokens, pad_multiple)
    assert collate(groups, pack="rows", pack_tokens=60).packed.input_ids.shape[0] > 1  # the several-rows case is exercised
    # consecutive whole groups within the budget; a group over it alone
    sizes = [micro_batch_tokens([g], "prefix") for g in groups]  # [47, 40, 26, 47]
    chunks = split_by_tokens(groups, 100, "prefix")
    assert [g for c in chunks for g in c] == groups
    assert all(micro_batch_tokens(c, "prefix") <= 100 or len(c) == 1 for c in chunks)
    assert [len(c) for c in chunks] == [2, 2] and sizes == [47, 40, 26, 47]
    assert [len(c) for c in split_by_tokens(groups, 10, "prefix")] == [1, 1, 1, 1]
    # split until as many as another rank needs, order kept
    assert [len(c) for c in split_to_count([groups], 3)] == [1, 1, 2]  # 4 -> 2 + 2 -> 1 + 1 + 2
    assert [g for c in split_to_count([groups], 3) for g in c] == groups
    with pytest.raises(ValueError, match="cannot make 5"):
        split_to_count([groups], 5)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_micro_batches_by_tokens_give_the_plain_loops_update(tiny_model, zero):
    """Micro-batches of varying group counts (a token budget) and DeepSpeed's boundary set by the
    learner: the same two steps as the plain loop (tolerance as in the test above)."""
    batches = [batch_for_step(s, 4) for s in range(2)]
    learner = make_learner(tiny_model, zero_stage=zero, micro_tokens=100, adam_eps=1e-4)
    assert [[len(c) for c in learner._micro_batches(b)] for b in batches] == [[2, 2], [1, 2, 1]]  # not one fixed size
    before = {k: v.clone() for k, v in learner.publish()[1].items()}
    for b in batches:
        assert learner.train_step(b)["skipped"] == 0
    _, got = learner.publish()
    want = plain_pytorch_steps(tiny_model, batches)
    moved = max((want[k] - before[k]).abs().max().item() for k in want)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"\nZeRO {zero}, micro_tokens 100: largest parameter change {moved:.3e}, largest difference from plain PyTorch {diff:.3e}")
    assert learner.version == 2 and moved > 1e-3
    assert diff < 1e-6
    with pytest.raises(ValueError, match="micro_tokens needs zero_stage 0-2"):
        make_learner(tiny_model, zero_stage=3, micro_groups=4, micro_tokens=100)


@pytest.mark.parametrize("zero", [0, 2])
def test_non_finite_batch_is_skipped_logged_counted_never_applied(tiny_model, zero, caplog):
    learner = make_learner(tiny_model, zero_stage=zero)
    learner.train_step(batch_for_step(0, 4))
    before = {k: v.clone() for k, v in learner.publish()[1].items()}
    opt_state = [v.clone() for st in learner.engine.optimizer.state_dict()["state"].values() for v in st.values() if torch.is_tensor(v)] if zero == 0 else None
    emb = learner.ref.get_input_embeddings().weight
    saved = emb.detach().clone()
    with torch.no_grad():
        emb[5] = float("nan")  # a corrupted reference: NaN reference log-probs, NaN loss
    with caplog.at_level(logging.WARNING, logger="agro_dist.learner"):
        m = learner.train_step(batch_for_step(1, 4))
    assert m["skipped"] == 1 and m["skipped_total"] == 1 and m["version"] == 1
    assert "batch skipped" in caplog.text
    after = learner.publish()[1]
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped batch changed the weights"
    if opt_state is not None:
        now = [v for st in learner.engine.optimizer.state_dict()["state"].values() for v in st.values() if torch.is_tensor(v)]
        assert all(torch.equal(x, y) for x, y in zip(opt_state, now)), "a skipped batch changed the optimizer state"
    with torch.no_grad():
        emb.copy_(saved)
    learner._ref_cache.clear()
    m = learner.train_step(batch_for_step(2, 4))
    assert m["skipped"] == 0 and m["version"] == 2
    assert all(math.isfinite(v.abs().max().item()) for v in learner.publish()[1].values())


def test_published_state_dict_is_a_real_copy(tiny_model):
    learner = make_learner(tiny_model, zero_stage=2)
    version, sd = learner.publish()
    frozen = {k: v.clone() for k, v in sd.items()}
    params = dict(learner.module.named_parameters(remove_duplicate=False))  # tied weights under every name
    for k, v in sd.items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), f"{k} is a view into a larger buffer"
        assert v.untyped_storage().data_ptr() != params[k].untyped_storage().data_ptr()
    learner.train_step(batch_for_step(0, 4))
    with torch.no_grad():
        for p in learner.module.parameters():
            p.add_(1.0)
    assert version == 0 and all(torch.equal(frozen[k], sd[k]) for k in sd)


def test_reference_log_probs_are_cached_per_group(tiny_model):
    learner = make_learner(tiny_model, exact_kl=False)
    assert learner.cfg.pack == "prefix"  # two decoder calls per micro-batch: the prompts, then the completions
    calls = []
    learner.ref.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    batch = batch_for_step(0, 4)
    learner.train_step(batch)
    assert len(calls) == 2 * 2  # two micro-batches
    m = learner.train_step(batch)  # replayed groups: no reference forward
    assert len(calls) == 2 * 2 and "kl" not in m and "log_ratio" in m
    # The exact KL needs the reference's hidden states, so it runs the reference pass for replayed groups too.
    learner = make_learner(tiny_model)
    calls = []
    learner.ref.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    learner.train_step(batch)
    learner.train_step(batch)
    assert len(calls) == 4 * 2


def test_reported_kl_is_the_exact_kl_also_on_data_pi_did_not_sample(tiny_model, tmp_path):
    """``kl`` = mean over sequences of sum over response positions of KL(pi(.|prefix) || pi_ref(.|prefix)),
    computed over the whole vocabulary; checked against full float64 logits of both models. The data are
    samples of pi_ref (the paper's offline setting), not of pi: there the mean sampled log-ratio
    estimates -KL(pi_ref || pi) < 0, no KL(pi || pi_ref) at all."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agro_dist.core.records import Completion

    torch.manual_seed(7)
    ref_dir = str(tmp_path / "ref")
    # Another random init with larger weights: a peaked pi_ref far from pi.
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model, initializer_range=0.3)).save_pretrained(ref_dir)
    learner = make_learner(tiny_model, ref_model=ref_dir, lr=0.0)
    pol, ref = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64) for d in (tiny_model, ref_dir))
    batch = batch_for_step(3, 4)
    for g in batch:  # completions sampled from pi_ref
        out = ref.generate(torch.tensor([g.prompt_token_ids] * g.n), do_sample=True, max_new_tokens=8, min_new_tokens=8,
                           pad_token_id=0, eos_token_id=None)
        g.completions = [Completion(row[len(g.prompt_token_ids):].numpy().astype("int32"), [0.0] * 8, c.reward, "length")
                         for row, c in zip(out, g.completions)]
    want, lr = [], []
    for g in batch:
        for c in g.completions:
            ids = torch.tensor([list(g.prompt_token_ids) + list(c.token_ids)])
            P, T = len(g.prompt_token_ids), len(c.token_ids)
            lp = torch.log_softmax(pol(ids).logits[0, P - 1:P - 1 + T], -1)
            lq = torch.log_softmax(ref(ids).logits[0, P - 1:P - 1 + T], -1)
            want.append(float((lp.exp() * (lp - lq)).sum().detach()))
            y = torch.tensor(c.token_ids)[:, None]
            lr.append(float((lp.gather(1, y) - lq.gather(1, y)).sum().detach()))
    m = learner.train_step(batch)
    exact = sum(want) / len(want)
    # float32 against float64 over ~6 positions of a 64-token vocabulary: 1e-5 relative is ~100x the rounding.
    assert abs(m["kl"] - exact) < 1e-5 * max(1.0, exact), (m["kl"], exact)
    assert abs(m["log_ratio"] - sum(lr) / len(lr)) < 1e-4
    print(f"\nexact KL {m['kl']:.4f} (float64 {exact:.4f}), sampled log-ratio {m['log_ratio']:.4f}")
    assert m["kl"] > 0.5 and m["log_ratio"] < -0.5, (m["kl"], m["log_ratio"])  # the sampled "KL" is negative here


def test_lr_schedule_and_config_errors(tiny_model):
    cfg = LearnerConfig(model=tiny_model, lr=1.0, warmup_steps=2, lr_schedule="cosine", total_steps=12, min_lr_ratio=0.1)
    assert [round(lr_at(cfg, s), 4) for s in (0, 1, 2, 7, 12, 50)] == [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    with pytest.raises(ValueError, match="multiple of world_size"):
        make_learner(tiny_model, batch_groups=3, micro_groups=2)
    with pytest.raises(FileNotFoundError, match="model folder not found: "):
        make_learner(tiny_model + "-missing")
    with pytest.raises(ValueError, match="unknown loss"):
        make_learner(tiny_model, loss="ppo")
    with pytest.raises(ValueError, match="zero_stage=3 is supported with one micro-batch per step"):
        make_learner(tiny_model, zero_stage=3, micro_groups=2)
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage >= 1"):
        make_learner(tiny_model, offload_optimizer=True)
    learner = make_learner(tiny_model)
    with pytest.raises(ValueError, match="wants this rank's 4 groups"):
        learner.train_step(batch_for_step(0, 3))


@pytest.mark.parametrize("loss,opts", [("agro_on", {"kl_estimator": "local"}), ("kl_pg", {}), ("grpo", {})])
def test_other_losses_train(tiny_model, loss, opts):
    learner = make_learner(tiny_model, loss=loss, loss_options=opts)
    m = learner.train_step(batch_for_step(0, 4))
    assert m["skipped"] == 0 and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    # Step 1, pi == pi_ref: the reported KL is 0 up to rounding and never below it (kl_pg's
    # unclamped token KL, the loss's own, once read -1.7e-7 in CI's driver run).
    assert 0 <= m["kl"] < 1e-5, m["kl"]


def test_agro_single_trains_its_value_head_and_checkpoints_it(tiny_model, tmp_path):
    # Policy lr 0: R = r - beta * lr is fixed, so V(x) is a plain regression the head must fit.
    learner = make_learner(tiny_model, loss="agro_single", lr=0.0, value_lr=5e-2)
    batch = batch_for_step(0, 4)
    first = learner.train_step(batch)
    assert first["skipped"] == 0 and first["value_mean"] == 0.0  # zero-initialised
    for _ in range(60):
        m = learner.train_step(batch)
    # The value loss 1/2 (R - V)^2 falls towards the within-prompt variance of R (its floor here).
    R = torch.tensor([[c.reward for c in g.completions] for g in batch])  # beta * lr = 0 at lr 0 (pi = pi_ref)
    floor = 0.5 * ((R - R.mean(1, keepdim=True)) ** 2).mean().item()
    assert m["loss_value"] < 0.5 * first["loss_value"] and m["loss_value"] < floor + 0.05, (first["loss_value"], m["loss_value"], floor)
    assert abs(m["value_mean"] - R.mean().item()) < 0.1
    # Saved and restored with the checkpoint: the next step is bitwise the same.
    root = str(tmp_path / "ck")
    learner.save_checkpoint(root)
    want = learner.train_step(batch)
    other = make_learner(tiny_model, loss="agro_single", lr=0.0, value_lr=5e-2)
    other.load_checkpoint(root)
    got = other.train_step(batch)
    assert got["value_mean"] == want["value_mean"] and got["loss_value"] == want["loss_value"]
    with pytest.raises(FileNotFoundError, match="no value head"):
        plain = str(tmp_path / "plain")
        make_learner(tiny_model).save_checkpoint(plain)
        make_learner(tiny_model, loss="agro_single").load_checkpoint(plain)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_a_loadable_hf_folder_written_atomically(tiny_model, tmp_path):
    learner = make_learner(tiny_model, zero_stage=2)
    learner.train_step(batch_for_step(0, 4))
    path = learner.save_checkpoint(str(tmp_path / "ckpt"), extra={"buffer_cursor": "1-0"})
    assert os.path.basename(path) == "step_00000001"
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_00000001"
    assert not [p for p in os.listdir(tmp_path / "ckpt") if p.startswith(".tmp")]
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(path, "hf"))
    _, sd = learner.publish()
    assert all(torch.equal(v, sd[k]) for k, v in hf.state_dict().items() if k in sd)
    assert os.path.exists(os.path.join(path, "hf", "model.safetensors"))
    # A crash mid-save leaves only a .tmp folder, which nothing reads.
    os.makedirs(tmp_path / "ckpt" / ".tmp-step_00000002")
    other = make_learner(tiny_model, zero_stage=2)
    meta = other.load_checkpoint(str(tmp_path / "ckpt"))
    assert meta["version"] == 1 and meta["extra"] == {"buffer_cursor": "1-0"}
    assert all(torch.equal(v, sd[k]) for k, v in other.publish()[1].items())
    with pytest.raises(FileNotFoundError):
        other.load_checkpoint(str(tmp_path / "nothing"))


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # set by this process's own learners
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.parametrize("zero,lora", [(0, 0), (2, 0), (2, 4)])
def test_kill_9_after_checkpoint_then_resume_is_bitwise_identical(tiny_model, tmp_path, zero, lora):
    worker = os.path.join(HERE, "learner_worker.py")
    common = ["--steps", "5", "--zero", str(zero), "--checkpoint-at", "2", "--lora-rank", str(lora)]
    full = _run([sys.executable, worker, tiny_model, str(tmp_path / "full"), *common])
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = _run([sys.executable, worker, tiny_model, str(tmp_path / "crash"), *common, "--kill-after", "3"])
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert not os.path.exists(tmp_path / "crash" / "params_3.safetensors")
    resumed = _run([sys.executable, worker, tiny_model, str(tmp_path / "crash"), *common, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step in (2, 3, 4):  # the two steps after the checkpoint, and one more
        a = load_file(str(tmp_path / "full" / f"params_{step}.safetensors"))
        b = load_file(str(tmp_path / "crash" / f"params_{step}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"step {step} differs after resume"


def _two_ranks_match_one(tiny_model, tmp_path, args, port, one_rank_args=()):
    """Three steps of learner_worker.py alone and as 2 ranks under torchrun: the same weights after
    each (float tolerance: gradients all-reduced across 2 ranks vs accumulated on 1)."""
    worker = os.path.join(HERE, "learner_worker.py")
    one = _run([sys.executable, worker, tiny_model, str(tmp_path / "one"), *args, *one_rank_args])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), worker, tiny_model, str(tmp_path / "two"), *args])
    assert two.returncode == 0, two.stderr[-3000:]
    for step in range(3):
        a = load_file(str(tmp_path / "one" / f"params_{step}.safetensors"))
        b = load_file(str(tmp_path / "two" / f"params_{step}.safetensors"))
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"step {step}: 1 rank vs 2 ranks ({' '.join(args)}), max difference {diff:.2e}")
        assert diff < 1e-6


def test_two_ranks_under_torchrun_match_one_rank(tiny_model, tmp_path):
    args = ["--steps", "3", "--zero", "2", "--batch-groups", "4", "--micro-groups", "1"]
    _two_ranks_match_one(tiny_model, tmp_path, args, 29631, one_rank_args=["--micro-groups", "2"])


def test_two_ranks_with_lora_match_one_rank(tiny_model, tmp_path):
    """learner.lora_rank under ZeRO 2 on 2 ranks: the adapters' gradients are all-reduced like any
    other (the published weights, adapters merged, match one rank's)."""
    args = ["--steps", "3", "--zero", "2", "--batch-groups", "4", "--micro-groups", "1", "--lora-rank", "4"]
    _two_ranks_match_one(tiny_model, tmp_path, args, 29633, one_rank_args=["--micro-groups", "2"])


def test_two_ranks_with_micro_batches_by_tokens_match_one_rank(tiny_model, tmp_path):
    """A token budget under which the two ranks' halves need different numbers of micro-batches
    (steps 1 and 2: 2 and 1): both run as many (ZeRO 2 reduces in each), and the update is one
    rank's."""
    natural = [[len(split_by_tokens(h, 100, "prefix")) for h in (b[:2], b[2:])] for b in (batch_for_step(s, 4) for s in range(3))]
    assert natural == [[1, 1], [2, 1], [2, 1]]
    _two_ranks_match_one(tiny_model, tmp_path, ["--steps", "3", "--zero", "2", "--batch-groups", "4", "--micro-tokens", "100"], 29632)


def test_rng_states_are_saved_as_tensors_that_load_without_unpickling_code(tmp_path):
    """A checkpoint's rng_rank*.pt loads with torch.load(weights_only=True) (storage may be shared or
    remote) and restores Python's, NumPy's and torch's streams exactly; a file in the old pickled
    format (numpy arrays inside) is not unpickled: it is skipped with a warning."""
    import random

    import numpy as np

    from agro_dist.learner.learner import _load_rng, _rng_state, _set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()  # cached Gaussians are part of the state
    path = tmp_path / "rng_rank0.pt"
    torch.save(_rng_state(), path)

    def draws():
        return random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(1).item()

    first = draws()
    _set_rng_state(torch.load(path, weights_only=True))
    assert draws() == first
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}, path)
    assert _load_rng(str(path)) is None


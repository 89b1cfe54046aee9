"""Deterministic checks of every registry loss: identities, independent loop references,
padding, metrics and bad input. (Unbiasedness against exact gradients is in
test_estimators_exact.py; the exact tabular quantities in test_tabular.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from agro_dist.core.losses import LOSSES, get_loss, kl_surrogate, needs_on_policy_data, needs_token_kl

F64 = torch.float64


def make_batch(P=3, n=4, T=6, seed=0, dtype=F64):
    """Random per-token log-probs (leaf, requires grad), right-padded masks of lengths 1..T."""
    g = torch.Generator().manual_seed(seed)
    B = P * n
    logps = (-torch.rand(B, T, generator=g, dtype=dtype) * 3).requires_grad_(True)
    ref = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.rand(B, generator=g, dtype=dtype)
    token_kl = torch.rand(B, T, generator=g, dtype=dtype).requires_grad_(True)
    return logps, ref, mask, rewards, token_kl


def options_for(name, B, T, token_kl, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    if name == "kl_pg":
        return dict(token_kl=token_kl)
    if name == "grpo":
        return dict(old_logps=-torch.rand(B, T, generator=g, dtype=F64) * 3)
    if name == "agro_single":
        return dict(values=torch.rand(B, generator=g, dtype=F64).requires_grad_(True))
    if name in ("agro_on", "rloo"):
        return dict(kl_estimator="local", token_kl=token_kl)
    return {}


def group_size_for(name, n):
    return 1 if name == "agro_single" else n


# ----------------------------------------------------------------------------- agro_off


@pytest.mark.parametrize("beta", [1e-3, 0.3, 5.0])
def test_agro_off_gradient_is_gradient_of_sample_variance_over_beta(beta):
    """grad S_off == grad [1/(2 beta (n-1)) sum_i (R_i - mean R)^2], to 1e-10 in float64."""
    P, n = 3, 5
    logps, ref, mask, rewards, _ = make_batch(P=P, n=n, T=7, seed=1)
    loss, _ = get_loss("agro_off")(logps, ref, mask, rewards, group_size=n, beta=beta)
    (g_loss,) = torch.autograd.grad(loss, logps)
    lr = ((logps - ref) * mask).sum(-1)
    R = (rewards - beta * lr).view(P, n)
    var_obj = ((R - R.mean(1, keepdim=True)).square().sum(1) / (2 * beta * (n - 1))).mean()
    (g_var,) = torch.autograd.grad(var_obj, logps)
    assert (g_loss - g_var).abs().max().item() < 1e-10
    assert g_loss.abs().max().item() > 1e-3  # not trivially zero


def test_agro_off_two_samples_formula():
    """n = 2: g = 1/2 (R_1 - R_2) (grad log pi(y_1) - grad log pi(y_2))."""
    P, n, beta = 4, 2, 0.7
    logps, ref, mask, rewards, _ = make_batch(P=P, n=n, seed=2)
    loss, _ = get_loss("agro_off")(logps, ref, mask, rewards, group_size=n, beta=beta)
    (g,) = torch.autograd.grad(loss, logps)
    R = (rewards - beta * ((logps - ref) * mask).sum(-1)).detach().view(P, 2)
    coef = 0.5 * (R[:, 0] - R[:, 1]) / P  # mean over prompts
    expected = -torch.stack([coef, -coef], 1).reshape(-1, 1) * mask
    assert torch.allclose(g, expected, atol=1e-12)


def test_agro_off_equals_rloo_with_sequence_estimator():
    logps, ref, mask, rewards, _ = make_batch(seed=3)
    a, _ = get_loss("agro_off")(logps, ref, mask, rewards, group_size=4, beta=0.2)
    b, _ = get_loss("rloo")(logps, ref, mask, rewards, group_size=4, beta=0.2)
    ga, gb = torch.autograd.grad(a, logps)[0], torch.autograd.grad(b, logps)[0]
    assert torch.equal(a, b) and torch.equal(ga, gb)


# ----------------------------------------------------------------------------- loop references


def _loop_reference_grad(logps, ref, mask, rewards, token_kl, n, beta, *, estimator, lr_term, lr_baseline="none"):
    """The estimator g of AGRO-MATH written token by token with Python loops, independently
    of the library; returns the expected d loss / d logps: -g_i,t / (P n), the surrogate
    being a mean over P prompts of 1/n sum_i."""
    B, T = logps.shape
    P = B // n
    lp, rf, m = logps.detach().tolist(), ref.tolist(), mask.tolist()
    kl = token_kl.detach().tolist()
    out = torch.zeros(B, T, dtype=F64)
    for p in range(P):
        rows = range(p * n, (p + 1) * n)
        lr_t = {i: [(lp[i][t] - rf[i][t]) if m[i][t] else 0.0 for t in range(T)] for i in rows}
        lr = {i: sum(lr_t[i]) for i in rows}
        R = {i: rewards[i].item() - beta * lr[i] for i in rows}

        def coef(i, t):
            if estimator == "sequence":
                return lr[i]
            if estimator == "causal":
                return sum(lr_t[i][t:])
            return lr_t[i][t] + sum(kl[i][u] for u in range(t + 1, T) if m[i][u])

        adv = {i: R[i] - sum(R[j] for j in rows if j != i) / (n - 1) for i in rows}
        q = {i: adv[i] ** 2 for i in rows}
        for i in rows:
            b_r = sum(rewards[j].item() for j in rows if j != i) / (n - 1)
            others = [j for j in rows if j != i]
            if lr_baseline == "loo":
                q_i = q[i] - sum(q[j] for j in others) / (n - 1)
            elif lr_baseline == "loo_var":  # n/(n-1) times the others' unbiased sample variance of R
                mean_o = sum(R[j] for j in others) / (n - 1)
                q_i = q[i] - n / (n - 1) * sum((R[j] - mean_o) ** 2 for j in others) / (n - 2)
            else:
                q_i = q[i]
            for t in range(T):
                if not m[i][t]:
                    continue
                b_c = sum(coef(j, t) for j in rows if j != i) / (n - 1)
                g = (rewards[i].item() - b_r) - beta * (coef(i, t) - b_c)
                if lr_term:
                    g -= q_i / (2 * beta)
                out[i, t] = -g / (P * n)
    return out


@pytest.mark.parametrize(
    "name,opts",
    [
        ("agro_off", {}),
        ("rloo", dict(kl_estimator="sequence")),
        ("rloo", dict(kl_estimator="causal")),
        ("rloo", dict(kl_estimator="local")),
        ("agro_on", dict(kl_estimator="sequence")),
        ("agro_on", dict(kl_estimator="causal", lr_baseline="loo")),
        ("agro_on", dict(kl_estimator="local")),
        ("agro_on", dict(kl_estimator="sequence", lr_baseline="loo_var")),
        ("agro_on", dict(kl_estimator="causal", lr_baseline="loo_var")),
    ],
)
def test_gradient_matches_token_loop_reference(name, opts):
    n, beta = 3, 0.4
    logps, ref, mask, rewards, token_kl = make_batch(P=2, n=n, T=5, seed=4)
    kw = dict(opts)
    if kw.get("kl_estimator") == "local":
        kw["token_kl"] = token_kl
    loss, _ = get_loss(name)(logps, ref, mask, rewards, group_size=n, beta=beta, **kw)
    (g,) = torch.autograd.grad(loss, logps)
    expected = _loop_reference_grad(
        logps, ref, mask, rewards, token_kl, n, beta,
        estimator=opts.get("kl_estimator", "sequence"),
        lr_term=name == "agro_on",
        lr_baseline=opts.get("lr_baseline", "none"),
    )
    assert (g - expected).abs().max().item() < 1e-12


def test_kl_surrogate_g1_is_gradient_of_half_squared_log_ratio():
    logps, ref, mask, _, _ = make_batch(seed=5)
    s = kl_surrogate(logps, ref, mask, estimator="sequence").sum()
    half_sq = 0.5 * (((logps - ref) * mask).sum(-1)).square().sum()
    g1 = torch.autograd.grad(s, logps)[0]
    g2 = torch.autograd.grad(half_sq, logps)[0]
    assert torch.allclose(g1, g2, atol=1e-12)


# ----------------------------------------------------------------------------- kl_pg, grpo


def test_kl_pg_gradient():
    n, beta = 4, 0.3
    logps, ref, mask, rewards, token_kl = make_batch(P=2, n=n, seed=6)
    loss, _ = get_loss("kl_pg")(logps, ref, mask, rewards, group_size=n, beta=beta, token_kl=token_kl)
    g_lp, g_kl = torch.autograd.grad(loss, (logps, token_kl))
    B = logps.shape[0]
    r = rewards.view(-1, n)
    adv = (r - (r.sum(1, keepdim=True) - r) / (n - 1)).reshape(B, 1)
    m = mask.to(F64)
    assert torch.allclose(g_lp, -adv * m / B, atol=1e-12)
    assert torch.allclose(g_kl, beta * m / B, atol=1e-12)


def _grpo_loop(logps, ref, old, mask, rewards, n, beta, eps, agg):
    B, T = logps.shape
    total, tokens, per_seq = 0.0, 0, []
    for p in range(B // n):
        r = rewards[p * n:(p + 1) * n]
        mean, std = r.mean().item(), r.std().item()  # unbiased std, like TRL
        for i in range(p * n, (p + 1) * n):
            A = (rewards[i].item() - mean) / (std + 1e-4)
            s = 0.0
            cnt = 0
            for t in range(T):
                if not mask[i, t]:
                    continue
                rho = torch.exp(logps[i, t] - old[i, t])
                surr = torch.minimum(rho * A, rho.clamp(1 - eps, 1 + eps) * A)
                k3 = torch.exp(ref[i, t] - logps[i, t]) - (ref[i, t] - logps[i, t]) - 1
                s = s + (-surr + beta * k3)
                cnt += 1
            per_seq.append(s / max(cnt, 1))
            total, tokens = total + s, tokens + cnt
    return torch.stack(per_seq).mean() if agg == "seq_mean" else total / tokens


@pytest.mark.parametrize("agg", ["seq_mean", "token_mean"])
def test_grpo_matches_loop_reference_and_clips(agg):
    n, beta, eps = 4, 0.05, 0.2
    logps, ref, mask, rewards, _ = make_batch(P=2, n=n, seed=7)
    g = torch.Generator().manual_seed(8)
    old = logps.detach() + 0.5 * torch.randn(logps.shape, generator=g, dtype=F64)  # ratios well outside [0.8, 1.2]
    loss, metrics = get_loss("grpo")(logps, ref, mask, rewards, group_size=n, beta=beta, old_logps=old, loss_agg=agg)
    ref_loss = _grpo_loop(logps, ref, old, mask, rewards, n, beta, eps, agg)
    (g_lib,) = torch.autograd.grad(loss, logps)
    (g_ref,) = torch.autograd.grad(ref_loss, logps)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert torch.allclose(g_lib, g_ref, atol=1e-12)
    assert 0 < metrics["clip_frac"].item() < 1
    # Without the KL, a clipped token with the ratio past the bound in the advantage's
    # direction gets exactly zero gradient.
    loss0, _ = get_loss("grpo")(logps, ref, mask, rewards, group_size=n, beta=0.0, old_logps=old, loss_agg=agg)
    (g0,) = torch.autograd.grad(loss0, logps)
    r = rewards.view(-1, n)
    A = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1, 1).expand_as(logps)
    rho = torch.exp(logps.detach() - old)
    frozen = mask & (((A > 0) & (rho > 1 + eps)) | ((A < 0) & (rho < 1 - eps)))
    assert frozen.any() and (g0[frozen] == 0).all()
    assert (g0[mask & ~frozen] != 0).all()


def test_grpo_k3_is_nonnegative_and_zero_at_reference():
    logps, ref, mask, rewards, _ = make_batch(seed=9)
    _, m = get_loss("grpo")(logps, ref, mask, rewards, group_size=4, beta=0.1)
    assert m["k3_mean"].item() > 0
    _, m0 = get_loss("grpo")(ref.clone().requires_grad_(True), ref, mask, rewards, group_size=4, beta=0.1)
    assert m0["k3_mean"].item() == 0.0


# ----------------------------------------------------------------------------- agro_single, dpo


@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_agro_single_gradients(beta):
    logps, ref, mask, rewards, _ = make_batch(P=6, n=1, seed=10)
    values = torch.rand(6, dtype=F64).requires_grad_(True)
    loss, _ = get_loss("agro_single")(logps, ref, mask, rewards, group_size=1, beta=beta, values=values)
    g_lp, g_v = torch.autograd.grad(loss, (logps, values))
    lr = ((logps - ref) * mask).sum(-1)
    R = rewards - beta * lr
    B = logps.shape[0]
    # theta: the per-row gradient -(R - V) grad log pi, i.e. that of 1/(2 beta) (R - V)^2 when beta > 0.
    assert torch.allclose(g_lp, -((R - values) / B).detach().unsqueeze(1) * mask, atol=1e-12)
    if beta > 0:
        sq = ((R - values).square() / (2 * beta)).sum() / B
        assert torch.allclose(g_lp, torch.autograd.grad(sq, logps, retain_graph=True)[0], atol=1e-12)
    # value: gradient of 1/2 (R - V)^2.
    assert torch.allclose(g_v, -(R - values).detach() / B, atol=1e-12)


def test_dpo_pairs_and_classic_formula():
    beta = 0.5
    logps, ref, mask, _, _ = make_batch(P=3, n=2, seed=11)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5], dtype=F64)  # third pair is a tie
    loss, m = get_loss("dpo")(logps, ref, mask, rewards, group_size=2, beta=beta)
    lr = ((logps - ref) * mask).sum(-1)
    classic = [-F.logsigmoid(beta * (lr[0] - lr[1])), -F.logsigmoid(beta * (lr[3] - lr[2])), torch.zeros((), dtype=F64)]
    expected = torch.stack(classic).mean()
    assert abs(loss.item() - expected.item()) < 1e-12
    assert m["pairs"].item() == 2
    g, ge = torch.autograd.grad(loss, logps)[0], torch.autograd.grad(expected, logps)[0]
    assert torch.allclose(g, ge, atol=1e-12)
    assert (g[4:] == 0).all()  # the tie contributes nothing


def test_dpo_groups_use_all_ordered_pairs():
    beta = 0.3
    logps, ref, mask, _, _ = make_batch(P=1, n=3, seed=12)
    rewards = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    loss, m = get_loss("dpo")(logps, ref, mask, rewards, group_size=3, beta=beta)
    lr = ((logps - ref) * mask).sum(-1)
    expected = -(F.logsigmoid(beta * (lr[0] - lr[1])) + F.logsigmoid(beta * (lr[0] - lr[2]))) / 2
    assert m["pairs"].item() == 2 and abs(loss.item() - expected.item()) < 1e-12


# ----------------------------------------------------------------------------- every loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_garbage_changes_nothing(name):
    """Random garbage (NaN, inf, huge) in padded slots of every [B, T] input changes neither
    the loss nor any gradient, and padded slots get exactly zero gradient."""
    n = 4
    logps, ref, mask, rewards, token_kl = make_batch(P=2, n=n, seed=13)
    B, T = logps.shape
    gs = group_size_for(name, n)

    def run(fill):
        lp = torch.where(mask, logps, fill).detach().requires_grad_(True)
        tk = torch.where(mask, token_kl, fill).detach().requires_grad_(True)
        opts = options_for(name, B, T, tk)
        if "old_logps" in opts:
            opts["old_logps"] = torch.where(mask, opts["old_logps"], fill.flip(0))
        loss, metrics = get_loss(name)(lp, torch.where(mask, ref, fill.flip(1)), mask, rewards, group_size=gs, beta=0.3, **opts)
        leaves = [lp, tk] + [v for v in opts.values() if isinstance(v, torch.Tensor) and v.requires_grad and v is not tk]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss, metrics, grads

    g = torch.Generator().manual_seed(14)
    junk = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30, 3.0], dtype=F64)
    garbage = junk[torch.randint(len(junk), (B, T), generator=g)]
    clean_loss, clean_m, clean_g = run(torch.zeros(B, T, dtype=F64))
    dirty_loss, dirty_m, dirty_g = run(garbage)
    assert torch.isfinite(dirty_loss)
    assert torch.equal(clean_loss, dirty_loss)
    for k in clean_m:
        assert torch.equal(clean_m[k], dirty_m[k]), k
    for a, b in zip(clean_g, dirty_g):
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b)
        if a.shape == (B, T):
            assert (b[~mask] == 0).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_metrics_report_reward_regularised_reward_log_ratio_and_parts(name):
    n, beta = 4, 0.3
    logps, ref, mask, rewards, token_kl = make_batch(P=2, n=n, seed=15)
    B, T = logps.shape
    loss, m = get_loss(name)(logps, ref, mask, rewards, group_size=group_size_for(name, n), beta=beta, **options_for(name, B, T, token_kl))
    lr = ((logps - ref) * mask).sum(-1).detach()
    assert abs(m["reward_mean"].item() - rewards.mean().item()) < 1e-12
    assert abs(m["log_ratio_mean"].item() - lr.mean().item()) < 1e-12
    assert abs(m["reg_reward_mean"].item() - (rewards - beta * lr).mean().item()) < 1e-12
    parts = [v for k, v in m.items() if k.startswith("loss_")]
    assert parts, "no loss parts reported"
    assert abs(sum(p.item() for p in parts) - loss.item()) < 1e-10
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bad_input_raises_value_error_saying_what_is_wrong(name):
    n = 4
    logps, ref, mask, rewards, token_kl = make_batch(P=2, n=n, seed=16)
    B, T = logps.shape
    gs = group_size_for(name, n)
    opts = options_for(name, B, T, token_kl)
    fn = get_loss(name)

    def call(lp=logps, rf=ref, mk=mask, rw=rewards, group_size=gs, beta=0.3, **kw):
        return fn(lp, rf, mk, rw, group_size=group_size, beta=beta, **{**opts, **kw})

    with pytest.raises(ValueError, match="ref_logps must have the shape"):
        call(rf=ref[:, :-1])
    with pytest.raises(ValueError, match="mask must have the shape"):
        call(mk=mask[:-1])
    with pytest.raises(ValueError, match="rewards must have shape"):
        call(rw=rewards[:-1])
    with pytest.raises(ValueError, match="logps must be a 2-D"):
        call(lp=logps.reshape(-1))
    with pytest.raises(ValueError, match="not a positive multiple of group_size"):
        call(lp=logps[:-1], rf=ref[:-1], mk=mask[:-1], rw=rewards[:-1], group_size=n)
    for bad in (math.nan, math.inf, -math.inf):
        rw = rewards.clone()
        rw[3] = bad
        with pytest.raises(ValueError, match=r"rewards must be finite; non-finite at rows \[3\]"):
            call(rw=rw)
    with pytest.raises(ValueError, match="beta must be finite and >= 0"):
        call(beta=-0.1)
    with pytest.raises(ValueError, match="beta must be finite"):
        call(beta=math.nan)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        call(mk=mask.double() * 2)
    if name != "agro_single":
        with pytest.raises(ValueError, match=r"group_size must be >= 2"):
            call(group_size=1)
    for key in ("token_kl", "values", "old_logps"):
        if key in opts:
            with pytest.raises(ValueError, match=key):
                call(**{key: opts[key][:-1]})


def test_required_extras_and_options_are_checked():
    logps, ref, mask, rewards, token_kl = make_batch(seed=17)
    with pytest.raises(ValueError, match="kl_pg: token_kl must have shape"):
        get_loss("kl_pg")(logps, ref, mask, rewards, group_size=4, beta=0.1)
    with pytest.raises(ValueError, match="agro_single: values must have shape"):
        get_loss("agro_single")(logps, ref, mask, rewards, group_size=1, beta=0.1)
    with pytest.raises(ValueError, match="agro_on: token_kl"):
        get_loss("agro_on")(logps, ref, mask, rewards, group_size=4, beta=0.1, kl_estimator="local")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        get_loss("rloo")(logps, ref, mask, rewards, group_size=4, beta=0.1, kl_estimator="sequential")
    with pytest.raises(ValueError, match="lr_baseline must be"):
        get_loss("agro_on")(logps, ref, mask, rewards, group_size=4, beta=0.1, lr_baseline="mean")
    with pytest.raises(ValueError, match="loo_var.*needs n >= 3"):
        get_loss("agro_on")(logps, ref, mask, rewards, group_size=2, beta=0.1, lr_baseline="loo_var")
    with pytest.raises(ValueError, match="agro_on: beta must be > 0"):
        get_loss("agro_on")(logps, ref, mask, rewards, group_size=4, beta=0.0)
    with pytest.raises(ValueError, match="dpo: beta must be > 0"):
        get_loss("dpo")(logps, ref, mask, rewards, group_size=4, beta=0.0)
    with pytest.raises(ValueError, match="loss_agg"):
        get_loss("grpo")(logps, ref, mask, rewards, group_size=4, beta=0.1, loss_agg="sum")
    with pytest.raises(ValueError, match="group_size must be an int"):
        get_loss("agro_off")(logps, ref, mask, rewards, group_size=4.0, beta=0.1)


def test_registry():
    assert set(LOSSES) == {"agro_off", "agro_on", "rloo", "kl_pg", "grpo", "agro_single", "dpo"}
    with pytest.raises(ValueError, match="unknown loss 'agro'; choose one of"):
        get_loss("agro")
    assert needs_token_kl("kl_pg") and needs_token_kl("agro_on", kl_estimator="local")
    assert not needs_token_kl("agro_off") and not needs_token_kl("rloo", kl_estimator="causal")
    # Which losses the driver refuses on stale, replayed, logged or pi_ref data (docs/losses.md, "data").
    assert needs_on_policy_data("agro_on") and needs_on_policy_data("rloo")
    assert needs_on_policy_data("rloo", kl_estimator="local") and needs_on_policy_data("agro_on", lr_baseline="loo_var")
    for name in ("agro_off", "kl_pg", "grpo", "agro_single", "dpo"):
        assert not needs_on_policy_data(name), name


def test_bfloat16_inputs_are_computed_in_float32():
    logps, ref, mask, rewards, _ = make_batch(seed=18)
    lp16 = logps.detach().to(torch.bfloat16).requires_grad_(True)
    loss, _ = get_loss("agro_off")(lp16, ref.to(torch.bfloat16), mask, rewards.float(), group_size=4, beta=0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lp16.grad.dtype == torch.bfloat16 and torch.isfinite(lp16.grad.float()).all()

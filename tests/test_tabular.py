"""Exact tabular quantities (AGRO-MATH "How to verify" 1 and 3) and the Figure-1 experiment."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
import torch

from agro_dist import tabular as tb
from agro_dist.core.losses import get_loss
from toy_policy import max_z

F64 = torch.float64


def problem(P=3, K=6, beta=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_logp = tb.log_pi(torch.randn(P, K, generator=g, dtype=F64))
    mu_logp = tb.log_pi(torch.randn(P, K, generator=g, dtype=F64))
    rewards = torch.rand(P, K, generator=g, dtype=F64)
    logits = torch.randn(P, K, generator=g, dtype=F64)
    return logits, ref_logp, mu_logp, rewards, beta


def autograd(fn, logits):
    x = logits.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(x), x)[0]


def test_closed_form_gradients_match_autograd_of_exact_losses():
    logits, ref, mu, r, beta = problem()
    g_off = autograd(lambda x: tb.loss_off(x, mu, ref, r, beta), logits)
    g_on = autograd(lambda x: tb.loss_on(x, ref, r, beta), logits)
    assert (tb.grad_off_exact(logits, mu, ref, r, beta) - g_off).abs().max() < 1e-12  # Lemma 3
    assert (tb.grad_on_exact(logits, ref, r, beta) - g_on).abs().max() < 1e-12  # PD + LR
    # On-policy, Lemma 3 at mu = pi is the PD part only: the LR part is not negligible.
    pd_only = tb.grad_off_exact(logits, tb.log_pi(logits), ref, r, beta)
    assert (pd_only - g_on).abs().max() > 1e-3
    # L_off / beta without its theta-free part has the gradient of L_off / beta.
    g_scaled = autograd(lambda x: tb.loss_off_over_beta(x, mu, ref, r, beta), logits)
    assert (g_scaled - g_off / beta).abs().max() < 1e-12
    # KL-PG's expected direction equals autograd of -E_mu-weighted PG surrogate + beta KL.
    def kl_pg_obj(x):
        m = mu.exp()
        adv = r - (m * r).sum(-1, keepdim=True)
        return (-(m * adv * tb.log_pi(x)).sum(-1) + beta * tb.kl(tb.log_pi(x), ref)).mean()
    assert (tb.grad_kl_pg_exact(logits, mu, ref, r, beta) - autograd(kl_pg_obj, logits)).abs().max() < 1e-12


def test_on_policy_pd_term_is_the_rlhf_gradient():
    """Lemma 3 at mu = pi: -grad L_off / beta = grad J (the split form of AGRO-MATH)."""
    logits, ref, _, r, beta = problem(seed=1)
    pd = tb.grad_off_exact(logits, tb.log_pi(logits), ref, r, beta)
    grad_J = autograd(lambda x: tb.objective_J(x, ref, r, beta), logits)
    assert (-pd / beta - grad_J).abs().max() < 1e-12


def test_pi_star_is_the_zero_loss_stationary_point_of_both_losses():
    logits, ref, mu, r, beta = problem(seed=2)
    star = tb.pi_star_logp(ref, r, beta)
    # Theorem 1: the regularised reward of pi* is V*(x) = beta log Z(x) for every response.
    R = tb.reg_reward(star, ref, r, beta)
    assert (R - tb.soft_value(ref, r, beta).unsqueeze(1)).abs().max() < 1e-12
    for name, f in (("on", lambda x: tb.loss_on(x, ref, r, beta)), ("off", lambda x: tb.loss_off(x, mu, ref, r, beta))):
        assert f(star).item() < 1e-24, name
        assert autograd(f, star).abs().max() < 1e-12, name
        rand_loss = f(logits).item()
        assert rand_loss > 1e-3, name
        assert autograd(f, logits).abs().max() > 1e-3, name
    # pi* maximises J, with J(pi*) = E_x V*(x) (the soft value).
    J_star = tb.objective_J(star, ref, r, beta)
    assert abs(J_star.item() - tb.soft_value(ref, r, beta).mean().item()) < 1e-12
    assert J_star > tb.objective_J(logits, ref, r, beta)
    assert autograd(lambda x: tb.objective_J(x, ref, r, beta), star).abs().max() < 1e-12
    # KL-regularised PG from mu-data does not stop at pi* (the point of Figure 1).
    assert tb.grad_kl_pg_exact(star, mu, ref, r, beta).abs().max() > 1e-3
    assert tb.kl(tb.log_pi(logits), star).min() > 0 and tb.kl(star, star).abs().max() < 1e-12


def _flow(grad, ref, steps=4000):
    logits = ref.clone()
    for _ in range(steps):
        logits = logits - grad(logits)
    return tb.log_pi(logits)


@pytest.mark.parametrize("beta,p0,on_finds_pi_star", [(0.05, 0.08, False), (0.2, 0.08, False), (0.2, 0.35, True), (1.0, 0.08, True)])
def test_on_policy_loss_flow_from_pi_ref_reaches_pi_star_only_when_beta_is_large_enough(beta, p0, on_finds_pi_star):
    """docs/experiments.md: L_on = 1/2 Var_pi[R] is also zero on pi_ref restricted to the wrong answers
    (R constant there), a point outside pi_ref's support that Theorem 2 excludes. From pi_ref, with a
    rare right answer and a small beta, L_on's exact gradient flow goes there (P(right) -> 0, KL ->
    -log(1 - p0)), while L_off at mu = pi (the RL gradient) reaches pi*. Bandit: K = 50, reward 1 on one."""
    K = 50
    ref = torch.full((1, K), (1 - p0) / (K - 1), dtype=torch.float64)
    ref[0, 0] = p0
    ref, r = ref.log(), torch.zeros(1, K, dtype=torch.float64)
    r[0, 0] = 1.0
    star = tb.pi_star_logp(ref, r, beta)
    off = _flow(lambda x: tb.grad_off_exact(x, tb.log_pi(x), ref, r, beta) / beta, ref)
    on = _flow(lambda x: tb.grad_on_exact(x, ref, r, beta) / beta, ref)
    assert tb.kl(off, star).item() < 1e-2
    if on_finds_pi_star:
        assert tb.kl(on, star).item() < 1e-2
    else:
        assert on.exp()[0, 0].item() < 1e-3 and abs(tb.kl(on, ref).item() + math.log(1 - p0)) < 1e-3
        # ... towards a zero of L_on, as pi* is one (Var_pi[R] -> 0 as P(right) -> 0)
        assert tb.loss_on(on, ref, r, beta).item() < 1e-2 * tb.loss_on(ref, ref, r, beta).item()


def test_dpo_gradient_vanishes_at_pi_star_under_bradley_terry_labels():
    """Section 7: with pairs labelled by P(a > b) = sigmoid(r_a - r_b), the expected DPO gradient
    is zero at pi* and not at pi_ref (Monte Carlo over 40k pairs per prompt, 4/8 SE bands)."""
    P, K, beta, M = 2, 5, 0.5, 40000
    g = torch.Generator().manual_seed(3)
    ref = tb.log_pi(torch.randn(P, K, generator=g, dtype=F64))
    r = 2 * torch.rand(P, K, generator=g, dtype=F64)
    star = tb.pi_star_logp(ref, r, beta)
    a = torch.multinomial(ref.exp(), M, replacement=True, generator=g)
    b = torch.multinomial(ref.exp(), M, replacement=True, generator=g)
    p_a = torch.sigmoid(r.gather(1, a) - r.gather(1, b))
    a_wins = torch.rand(P, M, generator=g, dtype=F64) < p_a
    w, l = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    pair = torch.stack([w, l], -1).permute(1, 0, 2)  # [M, P, 2]

    def per_draw_grad(logits):
        x = logits.expand(M, P, K).clone().requires_grad_(True)
        lp = tb.log_pi(x).gather(2, pair).reshape(-1, 1)
        rf = ref.expand(M, P, K).gather(2, pair).reshape(-1, 1)
        rewards = torch.tensor([1.0, 0.0], dtype=F64).repeat(M * P)
        loss, _ = get_loss("dpo")(lp, rf, torch.ones_like(lp, dtype=torch.bool), rewards, group_size=2, beta=beta)
        loss.backward()
        return x.grad.reshape(M, -1) * M

    zero = torch.zeros(P * K, dtype=F64)
    z_star, z_ref = max_z(per_draw_grad(star), zero), max_z(per_draw_grad(ref), zero)
    print(f"\nDPO mean gradient: at pi* max|z| = {z_star:.2f}, at pi_ref max|z| = {z_ref:.1f}")
    assert z_star < 4.0
    assert z_ref > 8.0


def test_agro_single_is_stationary_at_pi_star_with_soft_value():
    """n = 1: with pi = pi* and V = beta log Z, every sample's gradient (theta and V) is zero."""
    P, K, beta = 4, 5, 0.3
    _, ref, _, r, _ = problem(P=P, K=K, seed=4)
    star = tb.pi_star_logp(ref, r, beta)
    y = torch.arange(P) % K
    lp = star.gather(1, y[:, None]).clone().requires_grad_(True)
    values = tb.soft_value(ref, r, beta).clone().requires_grad_(True)
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, m = get_loss("agro_single")(lp, ref.gather(1, y[:, None]), mask, r.gather(1, y[:, None]).squeeze(1), beta=beta, values=values)
    g_lp, g_v = torch.autograd.grad(loss, (lp, values))
    assert g_lp.abs().max() < 1e-12 and g_v.abs().max() < 1e-12
    values2 = (values.detach() + 0.1).requires_grad_(True)
    loss2, _ = get_loss("agro_single")(lp, ref.gather(1, y[:, None]), mask, r.gather(1, y[:, None]).squeeze(1), beta=beta, values=values2)
    assert torch.autograd.grad(loss2, values2)[0].abs().min() > 1e-3


# ----------------------------------------------------------------------------- Figure 1


@pytest.fixture(scope="module")
def figure1_rows():
    return tb.run_figure1(tb.Figure1Config())


def _curve(rows, mode, method):
    pts = [r for r in rows if r["mode"] == mode and r["method"] == method]
    return [p["step"] for p in pts], [p["kl_to_pi_star"] for p in pts]


def test_figure1_exact_agro_converges_kl_pg_stalls(figure1_rows):
    steps, agro = _curve(figure1_rows, "exact", "agro")
    _, klpg = _curve(figure1_rows, "exact", "kl_pg")
    print(f"\nexact mode: KL(pi||pi*) AGRO {agro[0]:.3e} -> {agro[-1]:.3e}, KL-PG {klpg[0]:.3e} -> {klpg[-1]:.3e}")
    assert agro[-1] < 1e-6
    assert klpg[-1] > 1e-3
    # Stalled: KL-PG sits at its own fixed point (relative change over the last 20% < 0.1%).
    i80 = int(0.8 * len(klpg))
    assert abs(klpg[-1] - klpg[i80]) / klpg[-1] < 1e-3
    assert tb.Figure1Config().steps == steps[-1]


def test_figure1_sampled_agro_keeps_falling_kl_pg_stalls(figure1_rows):
    _, agro = _curve(figure1_rows, "sampled", "agro")
    _, klpg = _curve(figure1_rows, "sampled", "kl_pg")
    q = len(agro) // 4
    print(f"\nsampled mode: AGRO KL at 1/4, 1/2, 3/4, end: {agro[q]:.2e} {agro[2*q]:.2e} {agro[3*q]:.2e} {agro[-1]:.2e}; KL-PG end {klpg[-1]:.2e}")
    # Keeps falling: each quarter of training at least 5x lower than the one before (a
    # geometric decrease: at pi* every sample has R_i = b_i, so the noise vanishes too).
    assert agro[2 * q] < agro[q] / 5 and agro[3 * q] < agro[2 * q] / 5 and agro[-1] < agro[3 * q] / 5
    assert min(klpg[q:]) > 1e-3


def test_figure1_cli_writes_csv_and_png(tmp_path):
    help_out = subprocess.run([sys.executable, "-m", "agro_dist.tabular", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--mode", "--beta", "--steps", "--n", "--out"):
        assert flag in help_out.stdout
    out = tmp_path / "fig"
    res = subprocess.run(
        [sys.executable, "-m", "agro_dist.tabular", "--steps", "200", "--out", str(out)], capture_output=True, text=True, check=True
    )
    assert "wrote" in res.stdout
    rows = list(csv.DictReader(open(out / "figure1.csv")))
    assert {r["mode"] for r in rows} == {"exact", "sampled"} and {r["method"] for r in rows} == {"agro", "kl_pg"}
    assert all(math.isfinite(float(r["kl_to_pi_star"])) for r in rows)
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "agro_dist.tabular", "--beta", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--beta > 0" in bad.stderr

"""The method's math against hand-computed values."""
import math

import numpy as np
import pytest
import torch

import bar


def test_normalized_cost_and_raw_reward():
    c = bar.normalized_cost([0.02, 0.05], 0.05)
    assert np.allclose(c, [0.4, 1.0])
    assert np.allclose(bar.task_reward([1, 0], c, 0.3), [1 - 0.12, -0.3])


def test_class_calibrated_reward():
    c = np.array([0.4, 1.0])
    S = np.array([1, 0])
    assert np.allclose(bar.task_reward(S, c, 0.5, "class", "easy"), [0.8, -0.5])
    assert np.allclose(bar.task_reward(S, c, 0.5, "class", "hard"), [0.8, 0.0])      # failure: nothing for cheapness
    assert np.allclose(bar.task_reward(S, c, 0.5, "class", "intractable"), [-0.2, -0.5])  # only cost counts
    with pytest.raises(ValueError):
        bar.task_reward(S, c, 0.5, "class", "nonsense")


def test_boundary_reference_matches_formula():
    # s_S = 0.2, C_S/C_L = 0.25; s_L = 0.8; lam = 0.3 -> max(0.2 - 0.075, 0.8 - 0.3) = 0.5
    lam = 0.3
    r_s = bar.task_reward([1, 0, 0, 0, 0], [0.25] * 5, lam)
    r_l = bar.task_reward([1, 1, 1, 1, 0], [1.0] * 5, lam)
    assert bar.boundary_reference(r_s, r_l) == pytest.approx(0.5)
    # Easy task: always-small is the better static policy.
    r_s = bar.task_reward([1] * 5, [0.2] * 5, lam)
    assert bar.boundary_reference(r_s, r_l) == pytest.approx(1 - 0.06)


def test_advantage_hand_computed():
    R = np.array([1.0, 0.0, 0.5, 0.5])           # mean 0.5, std sqrt(0.125)
    A = bar.advantages(R, eta=0.0, sigma_min=0.0)
    assert np.allclose(A, (R - 0.5) / math.sqrt(0.125))
    A = bar.advantages(R, eta=1.0, sigma_min=0.1)
    assert np.allclose(A, R / (math.sqrt(0.125) + 0.1))
    # std pooled with the boundary rollouts: [1, 0, .5, .5, 0, 1] -> std = sqrt(1/6)
    A = bar.advantages(R, eta=0.5, sigma_min=0.0, R_ref=[0.0, 1.0])
    assert np.allclose(A, (R - 0.25) / math.sqrt(1 / 6))


def test_all_fail_hard_group_bopo_negative_grpo_rewards_cheapest_failure():
    """The degenerate cheap-failure fix: a Hard task whose G rollouts all fail, at different costs."""
    lam, C_L = 0.3, 0.05
    cost = np.array([0.01, 0.02, 0.03, 0.05])       # all failures; the first is the cheapest
    c = bar.normalized_cost(cost, C_L)
    S = np.zeros(4)
    # Vanilla GRPO: raw reward, group baseline -> the cheapest failure gets a positive advantage.
    A_grpo = bar.advantages(bar.task_reward(S, c, lam), eta=0.0, sigma_min=0.05)
    assert A_grpo[0] > 0 and A_grpo[-1] < 0 and A_grpo[0] == A_grpo.max()
    # BoPO: class-calibrated (Hard: failure earns 0), minus b(x), reference-guided (eta > 0).
    s_S, s_L, cS, cL = [0, 0, 0, 0, 1], [1, 1, 1, 0, 1], [0.3] * 5, [1.0] * 5
    r_s, r_l = bar.task_reward(s_S, cS, lam, "class", "hard"), bar.task_reward(s_L, cL, lam, "class", "hard")
    b = bar.boundary_reference(r_s, r_l)
    assert b == pytest.approx(0.8 * 0.7)
    R = bar.task_reward(S, c, lam, "class", "hard") - b
    A_bopo = bar.advantages(R, eta=0.5, sigma_min=0.05, R_ref=np.concatenate([r_s, r_l]) - b)
    assert np.all(A_bopo < 0)
    assert np.allclose(A_bopo, A_bopo[0])  # no failure is preferred for being cheap
    # The subtlety: with a raw cost term, even the reference baseline still ranks cheaper failures higher.
    R_raw = bar.task_reward(S, c, lam) - bar.boundary_reference(bar.task_reward(s_S, cS, lam), bar.task_reward(s_L, cL, lam))
    A_raw = bar.advantages(R_raw, eta=0.5, sigma_min=0.05)
    assert np.all(A_raw < 0) and A_raw[0] > A_raw[-1]


def test_clipped_surrogate_and_k3_hand_computed():
    logp_old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    logp = torch.log(torch.tensor([0.75, 0.25, 0.55]))   # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -2.0, 1.0])
    s = bar.clipped_surrogate(logp, logp_old, adv, 0.2)
    # -min(1.5*1, 1.2*1) = -1.2 ; -min(0.5*-2, 0.8*-2) = 1.6 ; -min(1.1, 1.1) = -1.1
    assert torch.allclose(s, torch.tensor([-1.2, 1.6, -1.1]), atol=1e-6)
    ref = torch.log(torch.tensor([0.5, 0.5, 0.55]))
    kl = bar.k3_kl(logp, ref)
    exp = [0.5 / 0.75 - math.log(0.5 / 0.75) - 1, 2 - math.log(2) - 1, 0.0]
    assert torch.allclose(kl, torch.tensor(exp), atol=1e-6)
    mask = torch.tensor([1.0, 1.0, 0.0])
    loss, st = bar.bopo_loss(logp, logp_old, ref, adv, mask, 0.2, 0.1)
    assert loss.item() == pytest.approx(((-1.2 + 1.6) + 0.1 * (exp[0] + exp[1])) / 2, abs=1e-6)
    assert st["losses/clipfrac"] == pytest.approx(1.0)


def test_k3_is_unbiased_for_kl():
    """Independent reference: E_{a~pi}[k3] equals the exact KL(pi || ref) on a 2-label policy."""
    pi, ref = torch.tensor([0.3, 0.7]), torch.tensor([0.6, 0.4])
    exact = (pi * (pi / ref).log()).sum()
    k3 = (pi * bar.k3_kl(pi.log(), ref.log())).sum()
    assert k3.item() == pytest.approx(exact.item(), abs=1e-6)


def test_frontier_metrics_on_known_curve():
    # Bounds: small (C=1, SR=.2), large (C=3, SR=.6). One router point at c_hat = 0.5, PGR = 1.
    bounds = {"C_S": 1.0, "C_L": 3.0, "SR_S": 0.2, "SR_L": 0.6}
    pts = [{"mean_cost": 2.0, "success_rate": 0.6}, {"mean_cost": 2.5, "success_rate": 0.5}]
    m = bar.frontier_metrics(pts, bounds)
    # PGR frontier: 2x on [0, .5], then 1 -> APGR = .25 + .5 = .75; SR = .2 + .4 PGR -> AUC = .2 + .4*.75
    assert m["apgr"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(0.5)
    assert m["cpt50"] == pytest.approx(0.25)
    assert m["cpt80"] == pytest.approx(0.4)
    assert m["cost_to_match_large"] == pytest.approx(2.0)
    # A point dearer than always-large (c_hat = 1.5) counts only through the interpolation up to c_hat = 1:
    # envelope (0, 0), (.5, .5), (1.5, 1) -> area .125 + (.5 + .75) / 2 * .5 = .4375; PGR .8 at c_hat 1.1.
    m = bar.frontier_metrics([{"mean_cost": 2.0, "success_rate": 0.4}, {"mean_cost": 4.0, "success_rate": 0.6}], bounds)
    assert m["apgr"] == pytest.approx(0.4375)
    assert m["cpt80"] == pytest.approx(1.1) and m["cost_to_match_large"] == pytest.approx(4.0)
    # Boundaries without a success gap (e.g. only putnext tasks): nothing to normalise by, no crash.
    flat = {"C_S": 1.0, "C_L": 3.0, "SR_S": 0.02, "SR_L": 0.02}
    assert bar.frontier_metrics(pts, flat) == {"auc": None, "apgr": None, "cpt50": None, "cpt80": None,
                                               "cost_to_match_large": 2.0}
    # Never reaching a level -> None.
    assert bar.frontier_metrics([{"mean_cost": 2.0, "success_rate": 0.3}], bounds)["cpt50"] is None


def test_envelope_is_non_decreasing_and_area_matches_dense_integral():
    rng = np.random.default_rng(0)
    xs, ys = rng.random(12), rng.random(12)
    ex, ey = bar.envelope(xs, ys, (0.0, 0.0))
    assert np.all(np.diff(ex) >= 0) and np.all(np.diff(ey) > 0)
    grid = np.linspace(0, 1, 200001)
    dense = np.interp(grid, ex, ey).mean()
    assert bar.frontier_area(xs, ys, (0.0, 0.0)) == pytest.approx(dense, abs=1e-4)


def test_bootstrap_ci_brackets_mean():
    x = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = bar.bootstrap_ci(x, 2000, 0)
    assert lo < 0.3 < hi and hi - lo < 0.25
    assert bar.bootstrap_ci(np.ones(10), 100) == [1.0, 1.0]


def test_sft_loss_is_two_way_cross_entropy():
    lg = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    exp = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (1 + math.e))) / 2
    assert bar.sft_loss(lg, y).item() == pytest.approx(exp, abs=1e-6)


def test_auroc_hand_computed_with_ties():
    # Pairs (pos, neg): (.35,.1) (.35,.4) (.8,.1) (.8,.4) -> 3 of 4 ordered right.
    assert bar.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert bar.auroc([1.0, 1.0, 1.0], [0, 1, 1]) == pytest.approx(0.5)      # ties count half
    assert bar.auroc([3.0, 2.0, 1.0], [1, 0, 0]) == 1.0 and bar.auroc([1.0, 2.0], [1, 0]) == 0.0
    assert math.isnan(bar.auroc([1.0, 2.0], [0, 0]))

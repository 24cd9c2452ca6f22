"""Taxonomy, stratified sampler and calibration on constructed cases."""
import numpy as np
import pytest

import bar


@pytest.mark.parametrize("s_S,s_L,cls", [(0.8, 1.0, "easy"), (0.6, 0.6, "easy"), (0.2, 0.8, "hard"),
                                          (0.2, 0.4, "hard"), (0.2, 0.3, "intractable"), (0.0, 0.0, "intractable")])
def test_classify(s_S, s_L, cls):
    assert bar.classify(s_S, s_L, tau_easy=0.6, delta=0.2) == cls


def test_boundary_stats():
    mk = lambda t, s, c: {"family": "goto", "task": t, "success": s, "cost": c}
    st = bar.boundary_stats([mk(1, 1, 1.0), mk(1, 0, 3.0)], [mk(1, 1, 4.0), mk(1, 1, 6.0)])["goto/1"]
    assert (st["s_S"], st["s_L"], st["C_S"], st["C_L"]) == (0.5, 1.0, 2.0, 5.0)


def test_cheapest_success_and_strata():
    rs = [{"success": 0, "cost": 0.1}, {"success": 1, "cost": 0.5}, {"success": 1, "cost": 0.3}]
    assert bar.cheapest_success(rs)["cost"] == 0.3
    assert bar.cheapest_success([{"success": 0, "cost": 1}]) is None
    jobs = bar.strata_jobs(("goto", 5), N=4, per_stratum=2)
    assert len(jobs) == 10 and sorted({j[3] for j in jobs}) == [0, 1, 2, 3, 4]


def test_stratified_sampler_hits_each_strata_share_of_large_calls():
    theta = {m: {f: 1.0 for f in bar.FAMILIES} for m in bar.MODEL_NAMES}
    cfg = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml")
    jobs = [j for s in range(6) for j in bar.strata_jobs(("open", s), N=4, per_stratum=1)]
    res = bar.rollout(jobs, bar.StratifiedPolicy(4), cfg["executors"], theta)
    for k in range(5):
        d = np.concatenate([r["decisions"] for j, r in zip(jobs, res) if j[3] == k])
        assert abs(d.mean() - k / 4) < 0.08, (k, d.mean())


def test_calibration_lands_within_5_points_per_family_and_for_an_aggregate_only_pair():
    cfg = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml", [
        "env.families=[goto, pickup]", "calibration.tasks_per_family=30", "calibration.seeds=2",
        "calibration.iters=9", "workers=2"])
    theta = bar.calibrate(cfg, log=lambda *_: None)
    jobs = [(f, s, r) for f in ("goto", "pickup") for s in range(30) for r in range(2)]
    for m in bar.MODEL_NAMES:
        res = bar.run(jobs, (f"always_{m}",), cfg, theta)
        for f in ("goto", "pickup"):
            got = np.mean([r["success"] for r in res if r["family"] == f])
            assert abs(got - bar.targets_of(cfg, m)[f]) <= 0.05, (m, f, got)
    # The GPT-4o-mini -> GPT-4o pair publishes only an aggregate: one theta per model.
    cfg2 = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml", [
        "env.families=[goto, pickup]", "calibration.tasks_per_family=30", "calibration.seeds=2",
        "calibration.iters=9", "workers=2", "executors.small.targets={all: 0.504}",
        "executors.large.targets={all: 0.776}"])
    assert cfg2["executors"]["small"]["targets"] == {"all": 0.504}  # replaces the per-family figures whole
    shipped = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "gpt4o_pair.yaml")["executors"]
    assert shipped["small"]["targets"] == {"all": 0.504} and shipped["large"]["targets"] == {"all": 0.776}
    theta2 = bar.calibrate(cfg2, log=lambda *_: None)
    assert theta2["small"]["goto"] == theta2["small"]["pickup"]
    for m, target in (("small", 0.504), ("large", 0.776)):
        res = bar.run(jobs, (f"always_{m}",), cfg2, theta2)
        assert abs(np.mean([r["success"] for r in res]) - target) <= 0.05


def test_prune_large_keeps_success_lowers_cost_and_drops_unneeded_large_calls():
    cfg = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml", ["workers=1"])
    theta = {"small": {f: 1.0 for f in bar.FAMILIES}, "large": {f: 4.0 for f in bar.FAMILIES}}
    jobs = [("goto", s, 0, 0) for s in range(8)]
    res = bar.run(jobs, ("always_large",), cfg, theta)
    best = {j: r for j, r in zip(jobs, res) if r["success"]}
    assert len(best) >= 4
    pruned = bar.prune_large(best, cfg, theta)
    assert sum(sum(r["decisions"]) for r in pruned.values()) < sum(sum(r["decisions"]) for r in best.values())
    for j, r in pruned.items():
        assert r["success"] and r["cost"] <= best[j]["cost"]
        again = bar.run([j], ("replay", {j: r["decisions"]}), cfg, theta)[0]  # the labels replay exactly
        assert again["success"] and again["cost"] == r["cost"] and again["decisions"] == r["decisions"]
    # A cheap model that never errs needs no LARGE call at all.
    perfect = {m: {f: 50.0 for f in bar.FAMILIES} for m in bar.MODEL_NAMES}
    cfg0 = {**cfg, "executors": {**cfg["executors"], "gamma": 0.0}}
    res = bar.run(jobs, ("always_large",), cfg0, perfect)
    assert all(sum(r["decisions"]) == 0 for r in bar.prune_large(dict(zip(jobs, res)), cfg0, perfect).values())

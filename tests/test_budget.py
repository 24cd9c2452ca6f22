"""Budget-constrained decoding as a property: the cap is never exceeded."""
import numpy as np
import pytest

import bar

CFG = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml", ["workers=2"])
THETA = {m: {f: 1.0 for f in bar.FAMILIES} for m in bar.MODEL_NAMES}


def test_no_violation_over_thousands_of_random_episodes_and_caps():
    rng = np.random.default_rng(0)
    n, checked, exhausted = 0, 0, 0
    for trial in range(40):
        # Random caps (sometimes none, sometimes zero), random routing, short families for speed.
        cl = None if rng.random() < 0.2 else int(rng.integers(0, 10))
        cd = None if rng.random() < 0.3 else float(rng.uniform(0, 0.04))
        p = float(rng.random())
        jobs = [(f, int(s), int(trial)) for f in ("goto", "pickup") for s in rng.integers(0, 10**6, 25)]
        res = bar.run(jobs, ("random", p), CFG, THETA, bar.Budget(cl, cd))
        for r in res:
            n += 1
            assert cl is None or r["n_large"] <= cl
            assert cd is None or r["cost"] <= cd * (1 + 1e-9)
            checked += cd is not None or cl is not None
            exhausted += r["budget_exhausted"]
    assert n == 2000 and checked > 1000
    assert exhausted > 0  # the "not even a SMALL step fits" stop was exercised


def test_budget_masks_large_and_prompt_shows_what_is_left():
    ex = CFG["executors"]
    ep = bar.Episode("goto", 3, 0)
    b = bar.Budget(large_calls=1)
    assert b.allows(ep, bar.LARGE, ex)
    ep.n_large = 1
    assert not b.allows(ep, bar.LARGE, ex) and b.allows(ep, bar.SMALL, ex)
    assert "left 0" in bar.render_prompt(ep, b)[0]
    d = bar.Budget(dollars=bar.step_cost(0, bar.SMALL, ex))  # exactly one cheap step
    assert d.allows(ep, bar.SMALL, ex) and not d.allows(ep, bar.LARGE, ex)
    # Always-large under a cap of 2 large calls: exactly the first two steps are LARGE.
    r = bar.rollout([("goto", 3, 0)], bar.StaticPolicy("always_large"), ex, THETA, bar.Budget(2))[0]
    assert r["decisions"][:2] == [1, 1] and set(r["decisions"][2:]) <= {0}


@pytest.mark.parametrize("kw", [{"large_calls": -1}, {"dollars": -0.01}])
def test_negative_budget_is_a_clear_error(kw):
    with pytest.raises(bar.ConfigError, match="below zero"):
        bar.Budget(**kw)

"""The ScienceWorld adapter against the real simulator (needs java and `make install-envs`), and a real
executor (a tiny transformers model made here) driving it."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("scienceworld") is None,
                       reason="the scienceworld package is not installed"),
    pytest.mark.skipif(shutil.which("java") is None,
                       reason="ScienceWorld needs a java executable on PATH"),
]

import bar  # noqa: E402
from bar import ScienceWorldEnv  # noqa: E402

SW_CFG = {"test_seed_offset": 100000, "simplifications": "easy", "max_steps": 100}

TASK = "find-living-thing"  # 10-12 step gold paths, loads in ~0.1 s
# Gold phrasings that never appear in the valid-action list: with "easy" the doors
# start open (the gold path still opens them: a harmless "already open"), and the
# gold path names objects in a longer disambiguated form
# ("move egg dove egg in inventory to red box" where the list has "move dove to red box").


def _off_list(action):
    return action.startswith("open door to ") or " in inventory " in action


@pytest.fixture(scope="module")
def env():
    e = ScienceWorldEnv(TASK, SW_CFG)
    yield e
    e.close()


def test_families_match_package(env):
    assert list(ScienceWorldEnv.FAMILIES) == env._sw.get_task_names()


def test_gold_path_reaches_full_score(env):
    first = env.reset(0)
    assert env.mission and env.mission in first and env.steps == 0 and not env.done
    gold = env.gold_actions()
    assert 0 < len(gold) < 30
    off = []
    for action in gold:
        assert not env.done
        if action not in env.actions():  # valid-list membership at the moment it is played
            off.append(action)
        env.step(action)
    assert env.success == 1.0 and env.done and env.steps == len(gold)
    assert env.expert_failures == 0
    # Every gold action not in the list is one of the two documented phrasings.
    assert all(_off_list(a) for a in off), off
    assert len(off) < len(gold) / 2


def test_wrong_and_invalid_actions(env):
    env.reset(1)
    obs = env.step("xyzzy the frobnicator")
    assert "No known action" in obs and env.steps == 1 and not env.done
    env.step("look around")
    assert env.success < 1.0 and not env.done
    env.step("focus on agent")  # focusing on a non-target object fails the task
    assert env.done and env.success == 0.0


def test_max_steps_ends_episode(env):
    env.max_steps = 3
    try:
        env.reset(2)
        for _ in range(3):
            env.step("look around")
        assert env.done and env.success < 1.0
    finally:
        env.max_steps = 100


def test_train_and_test_seeds_are_disjoint(env):
    def variations(seeds):
        out = set()
        for s in seeds:
            env.reset(s)
            out.add(env._variation)
        return out
    train = variations(range(0, 20))
    test = variations(range(env.test_seed_offset, env.test_seed_offset + 20))
    assert len(train) == 20 and len(test) == 20 and not train & test
    # same seed -> same variation -> same start
    assert env.reset(5) == env.reset(5)


def test_reuse_across_seeds_and_families(env):
    a = env.reset(0)
    env.family = "lifespan-longest-lived"
    b = env.reset(3)
    assert a != b and "life span" in env.mission
    for action in env.gold_actions():
        env.step(action)
    assert env.success == 1.0
    env.family = TASK
    assert env.reset(0) == a


def test_gold_actions_mid_episode_keeps_state(env):
    env.family = TASK
    env.reset(4)
    env.step("look around")
    env.step("inventory")
    before = sorted(env.actions())
    assert env.gold_actions()
    assert sorted(env.actions()) == before and env.steps == 2


def test_two_processes_at_once(env):
    # A second JVM in another process, while this one is alive and in use.
    code = ("from bar import ScienceWorldEnv as E\n"
            f"e = E('find-plant', {SW_CFG!r}); e.reset(7); e.step('look around'); print('ok', e.steps); e.close()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.family = TASK
    env.reset(0)
    env.step("look around")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ok 1" in out
    assert env.steps == 1


def test_a_real_executor_drives_scienceworld(env, tiny_chat_model):
    """A transformers executor (a tiny random model: its replies are mostly not actions) plays a few
    ScienceWorld steps through the ordinary rollout: unparsable replies become "look around" and count
    as invalid; token counts are the model's own; the env's own pool keeps the JVM for the next episode."""
    real = [f"executors.{m}.{k}={v}" for m in bar.MODEL_NAMES
            for k, v in (("backend", "transformers"), ("model", tiny_chat_model), ("max_new_tokens", 5))]
    cfg = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml",
                          ["env.name=scienceworld", f"env.families=[{TASK}]", "env.max_steps=4", "env.max_live=1",
                           *real])
    ex = cfg["executors"]
    key = bar.env_pool_key(cfg["env"])
    bar._ENV_POOL[key] = [env]       # this module's JVM, as if a previous rollout of this config had left it
    env.max_steps = 4
    try:
        res = bar.rollout([(TASK, 0, 0), (TASK, 1, 0)], bar.StaticPolicy("random", 0.5), ex, {}, env=cfg["env"])
    finally:
        env.max_steps = 100
    assert [r["steps"] for r in res] == [4, 4] and all(0 <= r["success"] < 1 for r in res)
    assert all(r["cost"] > 0 and 0 <= r["invalid"] <= 4 for r in res)
    assert bar._ENV_POOL.pop(key) == [env]   # one JVM served both episodes (max_live = 1)

"""The TextWorld adapter (needs `make install-envs`), the reply-to-action rule, and the transformers
executor on a tiny model made in the test."""
import importlib.util

import pytest

import bar

needs_textworld = pytest.mark.skipif(importlib.util.find_spec("textworld") is None,
                                     reason="textworld is not installed: `make install-envs`")


@pytest.fixture(scope="module")
def tw_cfg(tmp_path_factory):
    return {"name": "textworld", "cache_dir": str(tmp_path_factory.mktemp("tw_games")), "max_steps": None,
            "test_seed_offset": 100000}


@needs_textworld
def test_textworld_game_is_generated_once_and_the_expert_wins_it(tw_cfg):
    env = bar.TextWorldEnv("coin_collector", tw_cfg)
    path = env.game_file(3)
    stamp = path.stat().st_mtime_ns
    obs = env.reset(3)
    assert env.game_file(3).stat().st_mtime_ns == stamp         # cached, not regenerated
    assert "coin" in env.mission and obs and env.max_steps == 80 and "go " in " ".join(env.actions())
    assert "north" not in env.mission and "south" not in env.mission   # the goal text names no route
    while not env.done:
        assert env.expert() in env.actions()
        env.step(env.expert())
    assert env.success == 1.0 and env.expert_failures == 0 and 20 <= env.steps < 80
    env.reset(3)
    env.step("go nowhere at all")                               # free text: the game just says no
    assert env.steps == 1 and not env.done and env.success == 0.0


@needs_textworld
def test_simulated_pair_on_textworld_common_dice_and_abilities(tw_cfg):
    ex = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml")["executors"]
    fams = bar.TextWorldEnv.FAMILIES
    jobs = [("coin_collector", 3, r) for r in range(3)]
    perfect = {m: {f: 50.0 for f in fams} for m in bar.MODEL_NAMES}
    weak = {m: {f: -3.0 for f in fams} for m in bar.MODEL_NAMES}
    good = bar.rollout(jobs, bar.StaticPolicy("always_large"), {**ex, "gamma": 0.0}, perfect, env=tw_cfg)
    bad = bar.rollout(jobs, bar.StaticPolicy("always_large"), ex, weak, env=tw_cfg)
    assert all(r["success"] == 1.0 for r in good) and all(r["success"] < 1.0 for r in bad)
    assert all(r["steps"] == 80 for r in bad)                    # failures run to the cap
    again = bar.rollout(jobs, bar.StaticPolicy("always_large"), ex, weak, env=tw_cfg)
    assert again == bad                                          # same dice, same trajectories


def test_parse_action_exact_then_case_and_space_then_fallback():
    valid = ["go north", "take red key from table", "look"]
    assert bar.parse_action("go north", valid, "look") == ("go north", True)
    assert bar.parse_action("  'Take  RED key from table.'\nbecause...", valid, "look") == ("take red key from table", True)
    assert bar.parse_action("\n\n GO North \n", valid, "look") == ("go north", True)
    assert bar.parse_action("I would go north", valid, "look") == ("look", False)
    assert bar.parse_action("", valid, "look") == ("look", False)


def test_transformers_executor_batches_and_counts_real_tokens(tiny_chat_model):
    chat = bar.TransformersChat(str(tiny_chat_model), max_new_tokens=6, temperature=0.0, device="cpu",
                                dtype="float32")
    convs = [[{"role": "system", "content": "Task : go forward"}, {"role": "user", "content": "turn left " * k}]
             for k in (1, 4, 9)]
    batched = chat.chat_many(convs)
    single = [chat.chat_many([c])[0] for c in convs]
    assert batched == single                              # left padding changes nothing
    for c, (text, n_prompt, n_completion) in zip(convs, batched):
        ids = chat.tok(chat.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
        assert n_prompt == len(ids) and 1 <= n_completion <= 6
    assert batched[0][1] < batched[1][1] < batched[2][1]
    sampled = bar.TransformersChat(str(tiny_chat_model), 6, 1.0, "cpu", "float32").chat_many(convs)
    assert len(sampled) == 3 and all(1 <= n <= 6 for _, _, n in sampled)


def test_real_executors_need_a_model_and_both_roles_real():
    path = bar.Path(bar.__file__).with_name("configs") / "smoke.yaml"
    with pytest.raises(bar.ConfigError, match="executors.small.model is not set"):
        bar.load_config(path, ["executors.small.backend=transformers", "executors.large.backend=transformers"])
    with pytest.raises(bar.ConfigError, match="both backends"):
        bar.load_config(path, ["executors.large.backend=openai", "executors.large.model=m",
                               "executors.large.base_url=http://localhost:8000/v1"])
    with pytest.raises(bar.ConfigError, match="base_url is not set"):
        bar.load_config(path, ["executors.small.backend=openai", "executors.small.model=m"])

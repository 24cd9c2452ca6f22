"""Environment text, the expert, the router's view of the world, and the router itself."""
import numpy as np
import pytest
import torch

import bar

CFG = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "smoke.yaml")
EX = CFG["executors"]


def test_families_render_balrog_text_and_the_expert_solves_them():
    perfect = {m: {f: 50.0 for f in bar.FAMILIES} for m in bar.MODEL_NAMES}
    ex = {**EX, "gamma": 0.0}
    for fam in bar.FAMILIES:
        env = bar.BabyAITextEnv(fam)
        obs = env.reset(1)
        assert "wall" in obs or "ball" in obs or "key" in obs or "door" in obs
        assert env.max_steps == bar.MAX_STEPS[fam]
        res = bar.rollout([(fam, s, 0) for s in range(8)], bar.StaticPolicy("always_small"), ex, perfect)
        assert all(r["success"] for r in res), fam        # the expert always finishes the task
        assert all(r["expert_failures"] == 0 for r in res)
    env = bar.BabyAITextEnv("open")
    env.reset(0)
    assert "door" in env.mission


def test_expert_recovers_after_mistakes():
    """A noisy executor still succeeds often: the plan is rebuilt after each deviation."""
    theta = {m: {f: 2.5 for f in bar.FAMILIES} for m in bar.MODEL_NAMES}
    res = bar.rollout([(f, s, 1) for f in bar.FAMILIES for s in range(6)], bar.StaticPolicy("always_large"), EX, theta)
    assert np.mean([r["success"] for r in res]) > 0.5
    assert sum(r["expert_failures"] for r in res) == 0


def test_prompt_reads_only_the_public_transcript():
    ep = bar.Episode("pickup", 7, 0)
    ep.turns = [("a wall 1 step forward", "turn left", bar.LARGE)]
    before = bar.render_prompt(ep, bar.Budget())
    # Change every piece of hidden simulator state: the dice, the expert's plan, the abilities.
    ep.u_correct[:] = 0.999
    ep.u_wrong[:] = 3
    ep.recent_errors = [1, 1, 1]
    ep.env.bot = None
    ep.env._expert = 5
    ep.route_rng = np.random.default_rng(123)
    assert bar.render_prompt(ep, bar.Budget()) == before
    assert "turn left" in before[1] and "LARGE" in before[1] and ep.env.mission in before[0]


def test_same_task_same_dice_same_trajectory_common_random_numbers():
    theta = {m: {f: 1.0 for f in bar.FAMILIES} for m in bar.MODEL_NAMES}
    a = bar.rollout([("putnext", 4, 2)], bar.StaticPolicy("random", 0.5), EX, theta)[0]
    b = bar.rollout([("putnext", 4, 2)], bar.StaticPolicy("random", 0.5), EX, theta)[0]
    assert a == b
    # Replaying the decisions reproduces the trajectory exactly (how SFT labels get their prompts).
    c = bar.rollout([("putnext", 4, 2)], bar.StaticPolicy("replay", {("putnext", 4, 2): a["decisions"]}), EX, theta,
                    record=True)[0]
    assert c["decisions"] == a["decisions"] and c["cost"] == a["cost"] and len(c["prompts"]) == len(a["decisions"])


def test_step_cost_grows_with_history_and_prices():
    assert bar.prompt_tokens(0, EX) == EX["system_tokens"]
    assert bar.prompt_tokens(100, EX) == EX["system_tokens"] + EX["history"] * EX["turn_tokens"]
    c0 = bar.step_cost(0, bar.SMALL, EX)
    assert c0 == pytest.approx((540 * 0.18 + 3 * 0.18) / 1e6)
    assert bar.step_cost(0, bar.LARGE, EX) / c0 == pytest.approx(0.88 / 0.18)


def test_router_truncates_left_keeps_header_and_roundtrips(tmp_path):
    texts = ["task: go to the red ball . step 1 spent 0.0 large 0 left any . obs: a wall 1 step forward . route: SMALL LARGE"]
    cfg = {**CFG, "router": {**CFG["router"], "context": 24}}
    r = bar.Router.create(cfg, texts)
    header = "task: go to the red ball . step 1 spent 0.0 large 0 left any .\n"
    body = "obs: a wall 1 step forward . act SMALL: turn left .\n" * 20 + "obs: a wall 1 step forward . route:"
    ids = r.encode([(header, body)])[0]
    h = r.tok(header, add_special_tokens=False)["input_ids"]
    assert len(ids) == 24 and ids[: len(h)] == h
    assert r.tok.decode(ids[-2:]).replace(" ", "") == "route:"
    p = r.p_large([(header, body), (header, "obs: a wall 1 step forward . route:")])
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))
    r.save(tmp_path / "ck")
    r2 = bar.Router.load(tmp_path / "ck")
    assert np.allclose(r2.p_large([(header, body)]), p[:1], atol=1e-6)
    with pytest.raises(bar.ConfigError, match="no router checkpoint"):
        bar.Router.load(tmp_path / "missing")


def test_rendering_only_the_recent_turns_changes_nothing_the_router_sees():
    """render_prompt(history=h) is a speed-up, not a different state: after the router's left
    truncation to its context the token ids are identical to those of the full transcript."""
    cfg = bar.load_config(bar.Path(bar.__file__).with_name("configs") / "default.yaml")
    theta = {m: {f: 0.5 for f in bar.FAMILIES} for m in bar.MODEL_NAMES}
    runs = bar.rollout([(f, s, 3) for f in bar.FAMILIES for s in range(2)], bar.StaticPolicy("random", 0.3),
                       EX, theta, record=True)
    full = [p for r in runs for p in r["prompts"]]
    short = [p for r in bar.rollout([(f, s, 3) for f in bar.FAMILIES for s in range(2)], bar.StaticPolicy("random", 0.3),
                                    EX, theta, record=True, history=cfg["router"]["history_turns"]) for p in r["prompts"]]
    assert len(full) == len(short) > 500 and sum(a != b for a, b in zip(full, short)) > 100  # long transcripts occur
    r = bar.Router.create(cfg, [h + b + " SMALL LARGE" for h, b in full])
    assert r.encode(full) == r.encode(short)


def test_pretrained_router_loads_by_name_and_trains_through_the_same_path(tmp_path):
    """router.pretrained names any AutoModelForCausalLM (a hub id on a GPU machine; here a tiny model
    saved to disk, since nothing can be downloaded): one code path for scratch and pretrained routers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    texts = ["task: go to the red ball . obs: a wall 1 step forward . route: SMALL LARGE"]
    tok = bar.train_tokenizer(texts, 64)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32, pad_token_id=tok.pad_token_id)
                     ).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = {**CFG, "router": {**CFG["router"], "pretrained": str(tmp_path / "tiny"), "dtype": "bfloat16"}}
    r = bar.Router.create(cfg)
    assert r.model.dtype == torch.bfloat16
    prompt = [("task: go to the red ball .\n", "obs: a wall 1 step forward . route:")]
    lg = r.label_logits(r.encode(prompt))
    assert lg.dtype == torch.float32 and lg.shape == (1, 2)  # label logits in fp32 whatever the weights
    bar.sft_loss(lg, torch.tensor([1])).backward()
    assert any(p.grad is not None for p in r.model.parameters())
    r.save(tmp_path / "ck")
    r2 = bar.Router.load(tmp_path / "ck")
    assert r2.model.dtype == torch.bfloat16
    assert np.allclose(r2.p_large(prompt), r.p_large(prompt), atol=1e-3)
    # A router trained on a GPU, reloaded where none is visible: one clear error, not a CUDA trace.
    meta = bar.json.loads((tmp_path / "ck" / "router.json").read_text())
    (tmp_path / "ck" / "router.json").write_text(bar.json.dumps({**meta, "device": "cuda"}))
    if not torch.cuda.is_available():
        with pytest.raises(bar.ConfigError, match="no GPU is visible"):
            bar.Router.load(tmp_path / "ck")

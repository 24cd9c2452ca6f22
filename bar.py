"""bar: Budget-Aware Agentic Routing via Boundary-Guided Training (arXiv 2602.21227).

One module, read top to bottom in pipeline order:

    0. config and files        YAML + --set overrides, atomic writes, JSONL logs
    1. environments            a small protocol; BabyAI (minigrid) as BALROG-style text, TextWorld, ScienceWorld
    2. executors and cost      the calibrated *simulated* pair; real ones: transformers, OpenAI-compatible HTTP
    3. rollouts                many episodes in lockstep, the router batched, budget-constrained decoding
    4. boundary training data  boundary policies -> Easy/Hard/Intractable -> stratified sampling -> labels
    5. router                  a causal LM; pi(LARGE|s) from two label tokens at the last position
    6. losses                  SFT cross-entropy; BoPO (boundary-relative reward, reference-guided advantage)
    7. metrics                 frontier, AUC, APGR, CPT, cost to match always-large, bootstrap intervals

Notation: task x; step t; decision a_t in {SMALL, LARGE}; step cost c_t in dollars; trajectory tau with
success S(tau) in {0,1} (progress in [0, 1] on the text games) and cost C(tau) = sum_t c_t.

The CPU default keeps the environment real and *simulates* the two executor models (section 2). Every
results file says which executors played.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

SMALL, LARGE = 0, 1
MODEL_NAMES = ("small", "large")


# ================================================================================================
# 0. Config and files
# ================================================================================================
class ConfigError(ValueError):
    """A bad config: the message names the key and the fix; scripts print it as one line."""


DEFAULTS: dict = yaml.safe_load(Path(__file__).with_name("configs").joinpath("defaults.yaml").read_text())


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = dict(base)
    for k, v in over.items():
        key = f"{where}{k}"
        if k not in base:
            raise ConfigError(f"unknown config key '{key}' (known here: {', '.join(sorted(base))})")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' must be a mapping, got {v!r}")
            # Free-form mappings (a pair's published success figures) accept any key and replace the
            # default whole: a pair with only an aggregate gives {all: x} and inherits no family.
            out[k] = dict(v) if k in FREE_FORM else _merge(base[k], v, key + ".")
        else:
            out[k] = _check_type(key, base[k], v)
    return out


FREE_FORM = {"targets"}


def _check_type(key: str, default, value):
    if default is None:  # keys whose default is null take any value (checked in validate_config)
        return value
    if value is None:
        raise ConfigError(f"config key '{key}' cannot be null (default: {default!r})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"config key '{key}' must be a whole number, got {value!r}")
        return type(default)(value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    """Defaults <- YAML file <- `--set a.b=value` overrides, every key validated against the defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (try configs/default.yaml or configs/smoke.yaml)")
    try:
        user = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"config file '{path}' must be a YAML mapping of keys (see configs/defaults.yaml)")
    import copy
    cfg = _merge(copy.deepcopy(DEFAULTS), user)  # a fresh tree: a caller may edit its config freely
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        node: dict = {}
        leaf = node
        parts = key.strip().split(".")
        for p in parts[:-1]:
            leaf[p] = {}
            leaf = leaf[p]
        leaf[parts[-1]] = yaml.safe_load(raw)
        cfg = _merge(cfg, node)
    cfg["name"] = cfg.get("name") or path.stem
    validate_config(cfg)
    return cfg


def validate_config(cfg: dict) -> None:
    if cfg["env"]["name"] not in ENVS:
        raise ConfigError(f"env.name = {cfg['env']['name']!r}: choose from {', '.join(ENVS)}")
    known = env_class(cfg["env"]).FAMILIES
    for f in cfg["env"]["families"]:
        if f not in known:
            raise ConfigError(f"env.families: unknown family '{f}' (choose from {', '.join(known)})")
    ex = cfg["executors"]
    backends = {m: ex[m]["backend"] for m in MODEL_NAMES}
    for m, b in backends.items():
        if b not in ("simulated", "transformers", "openai"):
            raise ConfigError(f"executors.{m}.backend = {b!r}: choose simulated, transformers or openai")
        if b != "simulated" and not ex[m]["model"]:
            raise ConfigError(f"executors.{m}.model is not set: the {b} backend needs a model name or path")
        if b == "openai" and not ex[m]["base_url"]:
            raise ConfigError(f"executors.{m}.base_url is not set: e.g. http://localhost:8000/v1 for vLLM")
    if len(set(backends.values()) & {"simulated"}) and len(set(backends.values())) > 1:
        raise ConfigError("executors: the simulated pair simulates both roles; set both backends to "
                          "simulated, or both to real ones (transformers / openai)")
    if is_simulated(ex) and not hasattr(env_class(cfg["env"]), "expert"):
        raise ConfigError(f"env.name = {cfg['env']['name']}: it has no expert that replans after a mistake, "
                          "so the simulated pair is not offered; use real executors (transformers / openai)")
    if cfg["env"]["name"] == "scienceworld" and not cfg["env"]["max_live"]:
        raise ConfigError("env.max_live must be set on ScienceWorld (one JVM, ~250 MB, per live episode): e.g. 16")
    for m in MODEL_NAMES:
        t = ex[m]["targets"]
        if not isinstance(t, dict) or not all(isinstance(v, (int, float)) for v in t.values()):
            raise ConfigError(f"executors.{m}.targets must map families (or 'all') to success rates, got {t!r}")
        if not t:
            raise ConfigError(f"executors.{m}.targets is empty: give 'all' or per-family success targets")
        for k, v in t.items():
            if k != "all" and k not in known and is_simulated(ex):  # targets calibrate the simulated pair only
                raise ConfigError(f"executors.{m}.targets: unknown family '{k}'")
            if not 0 <= v <= 1:
                raise ConfigError(f"executors.{m}.targets.{k} = {v} must be a success rate in [0, 1]")
        for k in ("price_in", "price_out"):
            if ex[m][k] < 0:
                raise ConfigError(f"executors.{m}.{k} = {ex[m][k]} must be >= 0 ($ per 1M tokens)")
    for cap in cfg["eval"]["large_call_caps"]:
        if cap is not None and (not isinstance(cap, int) or cap < 0):
            raise ConfigError(f"eval.large_call_caps: {cap!r} must be a non-negative integer or null")
    for cap in cfg["eval"]["dollar_caps"]:
        if isinstance(cap, bool) or not isinstance(cap, (int, float)):
            raise ConfigError(f"eval.dollar_caps: {cap!r} must be a number (a fraction of always-large's cost)")
        if cap < 0:
            raise ConfigError(f"eval.dollar_caps: {cap} is below zero; a budget must be >= 0")
    w = cfg["sft"]["large_weight"]
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0):
        raise ConfigError(f"sft.large_weight = {w!r} must be a positive number, or null for balanced weighting")
    if not 0 <= cfg["bopo"]["eta"] <= 1:
        raise ConfigError(f"bopo.eta = {cfg['bopo']['eta']} must lie in [0, 1]")
    if cfg["bopo"]["reward"] not in ("raw", "class"):
        raise ConfigError(f"bopo.reward = {cfg['bopo']['reward']!r} must be 'raw' or 'class'")
    if cfg["bopo"]["init"] not in ("sft", "scratch"):
        raise ConfigError(f"bopo.init = {cfg['bopo']['init']!r} must be 'sft' or 'scratch'")
    if not 0 <= cfg["bopo"]["hard_frac"] <= 1:
        raise ConfigError(f"bopo.hard_frac = {cfg['bopo']['hard_frac']} must lie in [0, 1]")
    for key in ("sampler.N", "sampler.per_stratum", "taxonomy.K", "bopo.G", "bopo.iters", "bopo.save_every",
                "bopo.tasks_per_iter", "bopo.epochs", "bopo.minibatch", "sft.epochs", "sft.batch", "eval.seeds",
                "router.context", "router.history_turns", "workers"):
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node < 1:
            raise ConfigError(f"{key} = {node} must be at least 1")
    if not hasattr(__import__("torch"), cfg["router"]["dtype"]):
        raise ConfigError(f"router.dtype = {cfg['router']['dtype']!r} is not a torch dtype (float32, bfloat16, ...)")


def run_dir(cfg: dict) -> Path:
    d = Path(cfg["out_dir"]) / cfg["name"]
    d.mkdir(parents=True, exist_ok=True)
    return d


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temp file in the same folder, then rename: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are for everyone to read
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"'{path}' not found: run the earlier stage first (see `make all`)")
    return json.loads(path.read_text())


def append_jsonl(path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=_json_default) + "\n")


def fail(msg: str) -> None:
    """Scripts end on bad input with one line that names the problem and the fix."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ================================================================================================
# 1. Environments: text games behind one small protocol
# ================================================================================================
# Everything below this section talks to an environment through this protocol only, so a new
# benchmark is one adapter class (registered in ENVS) and a config change:
#
#   FAMILIES                   the task families the adapter knows; a task is (family, seed)
#   __init__(family, env_cfg)  env_cfg = the config's `env` section
#   reset(seed) -> str         the first observation; sets .mission (the task text), .max_steps
#   step(action: str) -> str   the next observation; updates .steps, .done, .success
#   actions() -> list[str]     the valid actions now (what an LLM's reply is parsed against)
#   .success                   progress in [0, 1]: 0/1 on BabyAI, score/max_score (1 if won) on text games
#   .expert_failures           times the expert fell back (reported, 0 where there is no expert)
# and, only where the simulated executor pair is offered (it needs an expert that replans):
#   expert() -> str            the expert's action from the current state
#   features() -> tuple        (needed thing not in view, step needs an interaction, closed/locked door)
#   N_WRONG                    draws per step for "which wrong action" (common random numbers)
#
# BabyAI (the CPU default): BALROG's five families in an 8x8 room without extra distractors, built
# with upstream minigrid's level machinery (BALROG's own minigrid fork is not on PyPI). Objects are
# balls and keys only: a wrong `toggle` on a box destroys it.
FAMILIES = ("goto", "pickup", "open", "putnext", "pick_up_seq_go_to")
MAX_STEPS = {"goto": 64, "pickup": 64, "open": 128, "putnext": 128, "pick_up_seq_go_to": 128}
ACTIONS = ("turn left", "turn right", "go forward", "pick up", "drop", "toggle")
INTERACT = {3, 4, 5}


def _make_level(family: str):
    from minigrid.envs.babyai.core.roomgrid_level import RoomGridLevel
    from minigrid.envs.babyai.core.verifier import (BeforeInstr, GoToInstr, ObjDesc, OpenInstr,
                                                    PickupInstr, PutNextInstr)

    def obj(level, kind=None):
        o, _ = level.add_object(0, 0, kind or level._rand_elem(["ball", "key"]))
        return o

    class Level(RoomGridLevel):
        # Speed: the text wrapper, the bot and the env all ask for the egocentric view at each step;
        # compute it once per state, and skip the image observation that nothing here reads.
        def gen_obs_grid(self, agent_view_size=None):
            key = (self.step_count, id(self.grid), agent_view_size)
            if getattr(self, "_view_key", None) != key:
                self._view, self._view_key = super().gen_obs_grid(agent_view_size), key
            return self._view

        def gen_obs(self):
            return {"mission": self.mission}

        def gen_mission(self):
            if family == "open":
                # Two rooms, a locked door between them, its key in the agent's room.
                door, _ = self.add_door(0, 0, 0, locked=True)
                self.add_object(0, 0, "key", door.color)
                self.place_agent(0, 0)
                self.instrs = OpenInstr(ObjDesc("door", door.color))
                return
            a = obj(self)
            if family in ("goto", "pickup"):
                self.place_agent(0, 0)
                d = ObjDesc(a.type, a.color)
                self.instrs = GoToInstr(d) if family == "goto" else PickupInstr(d)
                return
            b = obj(self)
            while (b.type, b.color) == (a.type, a.color):  # two distinguishable objects
                self.grid.set(*b.cur_pos, None)
                b = obj(self)
            self.place_agent(0, 0)
            da, db = ObjDesc(a.type, a.color), ObjDesc(b.type, b.color)
            self.instrs = (PutNextInstr(da, db) if family == "putnext"
                           else BeforeInstr(PickupInstr(da), GoToInstr(db)))

    cols = 2 if family == "open" else 1
    return Level(room_size=8, num_rows=1, num_cols=cols, max_steps=MAX_STEPS[family])


def describe_view(env) -> tuple[str, set]:
    """BALROG-style text of the 7x7 egocentric view, and the set of (color, type) in sight.

    One line per visible object ("a red ball 1 step left and 2 steps forward"), doors with their
    state, the nearest wall straight ahead / left / right, and what the agent carries.
    """
    grid, vis = env.gen_obs_grid()
    ax, ay = grid.width // 2, grid.height - 1  # the agent, facing "up" in view coordinates
    lines, seen = [], set()
    for j in range(grid.height - 1, -1, -1):
        for i in range(grid.width):
            cell = grid.get(i, j)
            if not vis[i, j] or cell is None or cell.type == "wall" or (i, j) == (ax, ay):
                continue
            dx, dy = i - ax, ay - j
            where = []
            if dx:
                where.append(f"{abs(dx)} step{'s' * (abs(dx) > 1)} {'right' if dx > 0 else 'left'}")
            if dy:
                where.append(f"{dy} step{'s' * (dy > 1)} forward")
            state = ""
            if cell.type == "door":
                state = "locked " if cell.is_locked else ("open " if cell.is_open else "closed ")
            lines.append(f"a {state}{cell.color} {cell.type} {' and '.join(where)}")
            seen.add((cell.color, cell.type))
    for name, (di, dj) in (("forward", (0, -1)), ("left", (-1, 0)), ("right", (1, 0))):
        i, j, k = ax + di, ay + dj, 1
        while 0 <= i < grid.width and 0 <= j < grid.height and vis[i, j]:
            c = grid.get(i, j)
            if c is not None and c.type == "wall":
                lines.append(f"a wall {k} step{'s' * (k > 1)} {name}")
                break
            i, j, k = i + di, j + dj, k + 1
    if env.carrying is not None:
        lines.append(f"You carry a {env.carrying.color} {env.carrying.type}")
    return "\n".join(lines), seen


class BabyAITextEnv:
    """One BabyAI task as text, with an expert (minigrid's BabyAIBot) for the simulated executors.

    Expert after a mistake: BabyAIBot.replan(action) plans to *undo* mistakes (walk back, put things
    back). We instead rebuild the plan from the remaining instruction and what the agent carries,
    keeping what the bot has seen: shorter, and it never raised in our measurements
    (`expert_failures` counts the times it fell back to a fresh bot).
    """

    FAMILIES, N_WRONG, FALLBACK = FAMILIES, len(ACTIONS) - 1, "go forward"

    def __init__(self, family: str, env_cfg: dict | None = None):
        self.family = family
        self.level = _make_level(family)
        self.max_steps = min((env_cfg or {}).get("max_steps") or MAX_STEPS[family], MAX_STEPS[family])
        self.expert_failures = 0

    # -- public side: what an agent (and the router) sees --------------------------------------
    def reset(self, seed: int) -> str:
        import contextlib
        import io
        from minigrid.utils.baby_ai_bot import BabyAIBot
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints its rejection sampling
            self.level.reset(seed=int(seed))
        self.mission = self.level.mission
        self.steps, self.done, self.success = 0, False, False
        self.bot = BabyAIBot(self.level)
        self._expert = None
        self.obs, self.seen = describe_view(self.level)
        return self.obs

    def actions(self) -> list[str]:
        return list(ACTIONS)

    def step(self, action: str) -> str:
        """BALROG's rule: an action outside the six becomes "go forward"."""
        action = ACTIONS.index(action) if action in ACTIONS else 2
        expert = self.expert_action()
        _, reward, terminated, truncated, _ = self.level.step(action)
        self.steps += 1
        self.success = bool(terminated and reward > 0)
        self.done = bool(terminated or truncated or self.steps >= self.max_steps)
        self._expert = None
        if not self.done:
            if action != expert:
                self._rebuild_plan()
            self.obs, self.seen = describe_view(self.level)
        return self.obs

    # -- hidden side: simulator internals, never shown to the router ----------------------------
    def expert(self) -> str:
        return ACTIONS[self.expert_action()]

    def features(self) -> tuple[bool, bool, bool]:
        return not self.needed_in_view(), self.expert_action() in INTERACT, self.door_in_view()

    def expert_action(self) -> int:
        if self._expert is None:
            try:
                a = int(self.bot.replan(None))
            except Exception:  # noqa: BLE001 - the bot's asserts; fall back to a fresh plan
                self.expert_failures += 1
                self._rebuild_plan(fresh=True)
                try:
                    a = int(self.bot.replan(None))
                except Exception:  # noqa: BLE001
                    a = 2
            self._expert = a if a < len(ACTIONS) else 2  # `done` never helps here: go forward
        return self._expert

    def _remaining_instr(self):
        from minigrid.envs.babyai.core.verifier import BeforeInstr
        ins = self.level.instrs
        if isinstance(ins, BeforeInstr) and ins.a_done == "success":
            return ins.instr_b
        return ins

    def _rebuild_plan(self, fresh: bool = False):
        from minigrid.envs.babyai.core.verifier import PickupInstr, PutNextInstr, BeforeInstr
        from minigrid.utils.baby_ai_bot import BabyAIBot, DropSubgoal, GoNextToSubgoal
        old = self.bot
        bot = BabyAIBot.__new__(BabyAIBot)
        bot.mission, bot.stack, bot.bfs_counter, bot.bfs_step_counter = self.level, [], 0, 0
        bot.vis_mask = np.zeros_like(old.vis_mask) if fresh else old.vis_mask
        bot.prev_fwd_cell = None
        ins = self._remaining_instr()
        carrying = self.level.carrying
        if isinstance(ins, PutNextInstr) and carrying is not None and carrying in ins.desc_move.obj_set:
            bot.stack.append(DropSubgoal(bot))
            bot.stack.append(GoNextToSubgoal(bot, ins.desc_fixed, reason="PutNext"))
        else:
            bot._process_instr(ins)
            first = ins.instr_a if isinstance(ins, BeforeInstr) else ins
            if carrying is not None and isinstance(first, (PickupInstr, PutNextInstr)):
                bot._process_obs()
                bot.stack.append(DropSubgoal(bot))  # free the hands before the next pick-up
                bot.stack.append(GoNextToSubgoal(bot, bot._find_drop_pos()))
        self.bot = bot

    def needed_in_view(self) -> bool:
        """Is the object the instruction currently needs in sight? (a difficulty feature)"""
        from minigrid.envs.babyai.core.verifier import BeforeInstr, PutNextInstr
        ins = self._remaining_instr()
        if isinstance(ins, BeforeInstr):
            ins = ins.instr_a
        if isinstance(ins, PutNextInstr):
            desc = ins.desc_fixed if self.level.carrying in ins.desc_move.obj_set else ins.desc_move
        else:
            desc = ins.desc
        return (desc.color, desc.type) in self.seen or (
            self.level.carrying is not None and desc.type != "door"
            and (self.level.carrying.color, self.level.carrying.type) == (desc.color, desc.type))

    def door_in_view(self) -> bool:
        return "locked " in self.obs or "closed " in self.obs



class TextWorldEnv:
    """BALROG's three TextWorld families, generated offline from the task seed by TextWorld's own
    generator and cached under `env.cache_dir` (a few seconds each, once).

    Settings follow BALROG's description (its pre-generated games are not on PyPI) where TextWorld 1.7
    allows: treasure_hunter in hard mode with 20 rooms, locked doors and containers, but at level 25
    (an 11-step quest), not 30: level 30's quest sampler ran for over 15 minutes on some seeds, and its
    quests are at most 20 steps, so BALROG's filter "optimal path > 20 steps" could not apply anyway; the
    cooking game with 5 ingredients to find and prepare across 12 rooms, doors to open,
    cooking and cutting; coin_collector at level 120 (a 20-room chain plus 20 dead-end rooms). For the
    two quest games the goal text names only the last action, not the route. Limited inventory
    (`--drop`) is left out of the cooking game: with it TextWorld's planner returns no policy.

    The expert is TextWorld's own planner: the winning policy from the current state (it replans after
    mistakes). Progress = score / max_score, 1 if won; the episode ends when won, lost or at the cap.
    """
    FAMILIES, N_WRONG = ("treasure_hunter", "the_cooking_game", "coin_collector"), 720720  # lcm(1..16)
    FALLBACK = "look"  # what an unparsable reply becomes (counted invalid)
    MAX_STEPS = 80

    def __init__(self, family: str, env_cfg: dict):
        import importlib.util
        if importlib.util.find_spec("textworld") is None:
            raise ConfigError("env.name = textworld, but the textworld package is not installed: `make install-envs`")
        self.family, self.cache = family, Path(env_cfg["cache_dir"])
        self.max_steps = env_cfg.get("max_steps") or self.MAX_STEPS
        self.expert_failures, self._env = 0, None

    def game_file(self, seed: int) -> Path:
        """The compiled game of (family, seed), generated on first use. Written to a private folder
        and renamed into place, so parallel workers never read half a game."""
        path = self.cache / f"{self.family}_{seed}.z8"
        if path.exists():
            return path
        import shutil
        import textworld
        import textworld.challenges as ch
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache, prefix=".gen-"))
        try:
            opt = textworld.GameOptions()
            opt.seeds, opt.path, opt.force_recompile = seed, str(tmp / path.name), True
            opt.grammar.only_last_action = self.family != "the_cooking_game"
            if self.family == "treasure_hunter":
                game = ch.treasure_hunter.make({"level": 25}, opt)
            elif self.family == "coin_collector":
                game = ch.coin_collector.make({"level": 120}, opt)
            else:
                game = ch.cooking.make({"recipe": 5, "take": 5, "go": 12, "open": True, "cook": True,
                                        "cut": True, "drop": False, "recipe_seed": seed, "split": None}, opt)
            textworld.generator.compile_game(game, opt)
            os.replace(tmp / path.with_suffix(".json").name, path.with_suffix(".json"))
            os.replace(tmp / path.name, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    def reset(self, seed: int) -> str:
        import textworld
        infos = textworld.EnvInfos(admissible_commands=True, policy_commands=True, score=True,
                                   max_score=True, won=True, lost=True, objective=True, description=True)
        self.close()
        import warnings
        with warnings.catch_warnings():  # jericho: "not fully supported" (it reads no score; TextWorld does)
            warnings.simplefilter("ignore")
            self._env = textworld.start(str(self.game_file(seed)), request_infos=infos)
        self.state = self._env.reset()
        self.mission = " ".join(self.state.objective.split())
        self.steps, self.done, self.success, self.expert_failures = 0, False, 0.0, 0
        self.obs = _clean_feedback(self.state.description)
        return self.obs

    def step(self, action: str) -> str:
        self.state, _, done = self._env.step(action)
        self.steps += 1
        st = self.state
        self.success = 1.0 if st.won else max(0.0, st.score / max(st.max_score, 1))
        self.done = bool(done or st.won or st.lost or self.steps >= self.max_steps)
        self.obs = _clean_feedback(st.feedback)
        return self.obs

    def actions(self) -> list[str]:
        return list(self.state.admissible_commands)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    # -- hidden side ------------------------------------------------------------------------------
    def expert(self) -> str:
        if self.state.policy_commands:
            return self.state.policy_commands[0]
        self.expert_failures += 1           # no winning policy from here (rare): look around
        return "look"

    def features(self) -> tuple[bool, bool, bool]:
        words = [w for w in self.expert().lower().split()[1:] if w not in _FUNCTION_WORDS]
        text = self.obs.lower()
        return (any(w not in text for w in words), not self.expert().startswith("go "),
                "closed" in text or "locked" in text)


class ScienceWorldEnv:
    """One ScienceWorld JVM driven through the project's text-env protocol.

    Each seed maps to one task variation: seeds below `test_seed_offset` index
    the package's train variations, larger seeds its test variations, so the
    two seed ranges never share a variation. One instance holds one JVM (about
    1.5 s to start); reuse it across reset() calls, and switch task by setting
    `self.family = other` before reset(). Each reset re-loads the task (0.02-0.3 s).

    There is no expert()/features(): ScienceWorld ships only a fixed gold
    path per variation (gold_actions()); nothing replans after a mistake, so
    expert-labelled routing is not available here. expert_failures stays 0.

    Score: the simulator reports progress in [0, 1], or -1 when the task is
    failed (e.g. focusing on the wrong object). It does NOT flag a failed task
    as completed, so step() ends the episode on a negative score itself.
    """

    FAMILIES: tuple[str, ...] = (  # same order as get_task_names() in scienceworld 1.2.3
        "boil", "change-the-state-of-matter-of", "chemistry-mix",
        "chemistry-mix-paint-secondary-color", "chemistry-mix-paint-tertiary-color",
        "find-animal", "find-living-thing", "find-non-living-thing", "find-plant",
        "freeze", "grow-fruit", "grow-plant", "identify-life-stages-1",
        "identify-life-stages-2", "inclined-plane-determine-angle",
        "inclined-plane-friction-named-surfaces", "inclined-plane-friction-unnamed-surfaces",
        "lifespan-longest-lived", "lifespan-longest-lived-then-shortest-lived",
        "lifespan-shortest-lived", "measure-melting-point-known-substance",
        "measure-melting-point-unknown-substance", "melt", "mendelian-genetics-known-plant",
        "mendelian-genetics-unknown-plant", "power-component",
        "power-component-renewable-vs-nonrenewable-energy", "test-conductivity",
        "test-conductivity-of-unknown-substances", "use-thermometer")

    MAX_STEPS, FALLBACK = 100, "look around"

    def __init__(self, family: str, env_cfg: dict):
        import shutil
        if shutil.which("java") is None:
            raise ConfigError("ScienceWorld needs a Java runtime (java on PATH): "
                              "`sudo apt-get install default-jre-headless`, then `make install-envs`")
        import importlib.util
        if importlib.util.find_spec("scienceworld") is None:
            raise ConfigError("env.name = scienceworld, but the scienceworld package is not installed: "
                              "`make install-envs`")
        from scienceworld import ScienceWorldEnv as _SW  # imported late: optional, needs java
        self.family, self.max_steps = family, env_cfg.get("max_steps") or self.MAX_STEPS
        self.test_seed_offset, self.simplifications = env_cfg["test_seed_offset"], env_cfg["simplifications"]
        # py4j binds the gateway and its callback server to ephemeral ports (port=0),
        # so instances in several processes can run side by side without setup.
        self._sw = _SW("", envStepLimit=10**9)  # our own max_steps governs episode length
        self.mission, self.obs, self.steps, self.done = "", "", 0, False
        self.success, self.expert_failures = 0.0, 0
        self._variation, self._history, self._gold, self._valid = None, [], None, None
        self._splits = {}  # family -> (train, test) variation lists, fetched once

    def reset(self, seed: int) -> str:
        if self.family not in self.FAMILIES:
            raise ValueError(f"unknown ScienceWorld task {self.family!r}")
        sw = self._sw
        if self.family not in self._splits:  # the lists belong to the loaded task
            sw.load(self.family, 0, self.simplifications)
            self._splits[self.family] = (sw.get_variations_train(), sw.get_variations_test())
        train, test = self._splits[self.family]
        if seed < self.test_seed_offset:
            self._variation = train[seed % len(train)]
        else:
            self._variation = test[(seed - self.test_seed_offset) % len(test)]
        # Gold paths cost 0.1-8 s to generate, so they are only made on request.
        sw.load(self.family, self._variation, self.simplifications, generateGoldPath=False)
        self._history, self._gold, self._valid = [], None, None
        self.steps, self.done, self.success = 0, False, 0.0
        self.mission = sw.get_task_description()
        self.obs = f"{self.mission}\n\n{sw.look()}"  # look() is free: no move used
        return self.obs

    def step(self, action: str) -> str:
        # Call the Java side directly: the wrapper's step() also gathers look,
        # inventory and all valid actions every move (30-110 ms instead of ~1 ms).
        server = self._sw.server
        self.obs = server.step(action)  # unknown text -> "No known action matches that input."
        self._history.append(action)
        self.steps += 1
        self._valid = None
        score = round(100 * server.getScore())  # same rounding as the package
        failed, completed = score < 0, bool(server.getCompleted())
        self.success = 0.0 if failed else min(max(score / 100.0, 0.0), 1.0)
        if completed and score >= 100:
            self.success = 1.0
        self.done = failed or completed or self.steps >= self.max_steps
        return self.obs

    def actions(self) -> list[str]:
        # Usually ~100-1500 strings (up to ~4600), 15-100 ms a call: computed once per state.
        # After an ambiguous action the simulator waits for a choice and this is ['0', '1', ...].
        if self._valid is None:
            self._valid = sorted(set(self._sw.get_valid_action_object_combinations()))
        return list(self._valid)

    def gold_actions(self) -> list[str]:
        if self._gold is None:
            # Re-load with the gold path and replay this episode's moves; the simulator
            # is deterministic per variation, so the state is the same as before
            # (only the order in which some texts list objects can differ).
            self._sw.load(self.family, self._variation, self.simplifications, generateGoldPath=True)
            for action in self._history:
                self._sw.server.step(action)
            self._gold, self._valid = list(self._sw.get_gold_action_sequence()), None
        return list(self._gold)

    def close(self):
        if self._sw is not None:  # idempotent: the package also closes from __del__
            self._sw.close()
            self._sw = None


_FUNCTION_WORDS = {"the", "a", "an", "with", "from", "in", "into", "on", "to"}


def _clean_feedback(text: str) -> str:
    """TextWorld's feedback without the prompt sign and runs of blank lines."""
    lines = [ln.strip() for ln in text.replace(">", " ").splitlines()]
    return "\n".join(ln for ln in lines if ln)


ENVS = {"babyai": BabyAITextEnv, "textworld": TextWorldEnv, "scienceworld": ScienceWorldEnv}


def env_class(env_cfg: dict | None):
    return ENVS[(env_cfg or {}).get("name", "babyai")]

# ================================================================================================
# 2. Executors and cost
# ================================================================================================
# An executor pair produces agent steps: `act(episodes, model)` -> one (action, prompt tokens,
# completion tokens) per episode, for a batch of episodes at once, and `max_cost(episode, model)`, an
# upper bound on the next step's dollars that budget-constrained decoding checks before the call.
# Each role (small, large) picks a backend in the config: `simulated` (the CPU default, below),
# `transformers` (a local AutoModelForCausalLM) or `openai` (any OpenAI-compatible HTTP server).
#
# The simulated pair runs on the real environment and needs its expert:
#
#   p_m(s) = sigmoid(theta_{m,f} - beta_m * d(s) - gamma * e_t)      (prob. of the expert action)
#
# d(s) = w . [needed object not in view, step needs an interaction, closed/locked door in view]
# e_t  = the trajectory's errors in the last `error_window` steps (early mistakes compound).
# theta_{m,f}: one ability per (model, family), *fitted* to published success (calibrate()).
# beta_small > beta_large is the premise of step-level routing, and an assumption (README).
# Common random numbers: one uniform draw per (task, rollout seed, step) decides "correct?" and one
# picks the wrong action, shared by both models, so methods compare on equal footing.

def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def prompt_tokens(step: int, ex: dict) -> int:
    """Agent prompt = system text + the last `history` turns: later steps cost more."""
    return ex["system_tokens"] + ex["turn_tokens"] * min(step, ex["history"])


def usage_cost(model: int, prompt: int, completion: int, ex: dict) -> float:
    """Dollar cost of token usage by `model` at its per-1M list prices."""
    m = ex[MODEL_NAMES[model]]
    return (prompt * m["price_in"] + completion * m["price_out"]) / 1e6


def step_cost(step: int, model: int, ex: dict) -> float:
    """Expected dollar cost of agent step `step` by `model` (what budget-constrained decoding checks
    before the call): the agent's prompt at that step and the fixed completion length."""
    return usage_cost(model, prompt_tokens(step, ex), ex["completion_tokens"], ex)


class SimulatedExecutors:
    """The calibrated simulated pair. Needs an environment with an expert (BabyAI, TextWorld)."""

    def __init__(self, ex: dict, theta: dict):
        self.ex, self.theta = ex, theta  # theta[model_name][family]
        w = ex["difficulty"]
        self.w = (w["not_in_view"], w["interaction"], w["door"])

    def difficulty(self, ep) -> float:
        return sum(wi * fi for wi, fi in zip(self.w, ep.env.features()))

    def p_correct(self, ep, model: int) -> float:
        name = MODEL_NAMES[model]
        z = (self.theta[name][ep.family] - self.ex[name]["beta"] * self.difficulty(ep)
             - self.ex["gamma"] * sum(ep.recent_errors))
        return sigmoid(z)

    def max_cost(self, ep, model: int) -> float:
        return step_cost(ep.t, model, self.ex)  # exact: the simulated usage is known in advance

    def act(self, eps, model: int) -> list[tuple[str, int, int]]:
        out = []
        for ep in eps:
            t, expert = ep.env.steps, ep.env.expert()
            if ep.u_correct[t] < self.p_correct(ep, model):
                action = expert
            else:  # a uniformly random other valid action, drawn from the shared dice
                others = [a for a in ep.env.actions() if a != expert] or [expert]
                action = others[ep.u_wrong[t] % len(others)]
            ep.recent_errors = (ep.recent_errors + [int(action != expert)])[-self.ex["error_window"]:]
            out.append((action, prompt_tokens(t, self.ex), self.ex["completion_tokens"]))
        return out


# -- real executors: an LLM plays the step ---------------------------------------------------------
# The agent prompt (BALROG-style, plain, no reasoning): a system message with the task and the valid
# actions (all of them when there are at most `list_actions`, as on BabyAI and TextWorld; ScienceWorld
# has about a thousand, so there it gets an even sample of them), then the last `history` turns and the
# current observation. The reply is parsed to a valid action by `parse_action`.
AGENT_SYSTEM = ("You are an agent playing a text game. Task: {mission}\n"
                "Valid actions now: {actions}\n"
                "Answer with exactly one action, copied from the valid actions, and nothing else.")


def agent_messages(ep, history: int, list_actions: int = 60) -> list[dict]:
    valid = ep.env.actions()
    shown = valid if len(valid) <= list_actions else valid[:: -(-len(valid) // list_actions)]
    more = "" if len(shown) == len(valid) else f" (and {len(valid) - len(shown)} more of these forms)"
    msgs = [{"role": "system", "content": AGENT_SYSTEM.format(mission=ep.env.mission,
                                                             actions="; ".join(shown) + more)}]
    for obs, action, _ in ep.turns[-history:] if history else ep.turns:
        msgs += [{"role": "user", "content": obs}, {"role": "assistant", "content": action}]
    msgs.append({"role": "user", "content": ep.obs})
    return msgs


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def parse_action(reply: str, valid: list[str], fallback: str) -> tuple[str, bool]:
    """The reply's first non-empty line, stripped of quotes and a trailing full stop, as an action:
    1. exactly a valid action;  2. equal to one up to case and whitespace;  3. otherwise `fallback`
    (the environment's own rule for unparsable output: BabyAI's "go forward", as BALROG), and the step
    counts as invalid (`invalid` in every results row)."""
    line = next((ln for ln in reply.strip().splitlines() if ln.strip()), "")
    line = line.strip().strip("\"'`").rstrip(".").strip()
    if line in valid:
        return line, True
    by_norm = {_norm(a): a for a in valid}
    if _norm(line) in by_norm:
        return by_norm[_norm(line)], True
    return fallback, False


class LLMExecutors:
    """Both roles played by real models: a `backend` per role with `chat_many(list of message lists)`
    -> [(reply, prompt tokens, completion tokens)], batched across episodes."""

    def __init__(self, ex: dict):
        self.ex = ex
        self.backends = [_backend(ex, m) for m in MODEL_NAMES]

    def max_cost(self, ep, model: int) -> float:
        """Upper bound before the call: at most one token per UTF-8 byte of the messages (byte-level and
        byte-fallback tokenizers never exceed it), 16 template tokens per message plus 128 (headers such
        as Llama's date line), and `max_new_tokens` of completion. Loose, on purpose."""
        msgs = agent_messages(ep, self.ex["history"])
        bound = sum(len(m["content"].encode()) + 16 for m in msgs) + 128
        return usage_cost(model, bound, self.ex[MODEL_NAMES[model]]["max_new_tokens"], self.ex)

    def act(self, eps, model: int) -> list[tuple[str, int, int]]:
        replies = self.backends[model].chat_many([agent_messages(ep, self.ex["history"]) for ep in eps])
        out = []
        for ep, (reply, n_prompt, n_completion) in zip(eps, replies):
            action, ok = parse_action(reply, ep.env.actions(), ep.env.FALLBACK)
            ep.invalid += not ok
            out.append((action, n_prompt, n_completion))
        return out


_BACKENDS: dict = {}  # one model / client per process and role configuration


def _backend(ex: dict, model: str):
    c = ex[model]
    key = (model, json.dumps(c, sort_keys=True, default=str))
    if key not in _BACKENDS:
        if c["backend"] == "transformers":
            _BACKENDS[key] = TransformersChat(c["model"], c["max_new_tokens"], c["temperature"],
                                              c["device"], c["dtype"])
        else:
            _BACKENDS[key] = OpenAIClient(model, c["base_url"], c["model"], c["api_key_env"], c["timeout"],
                                          c["retries"], c["backoff"], c["concurrency"], c["max_new_tokens"],
                                          c["temperature"])
    return _BACKENDS[key]


def make_executors(ex: dict, theta: dict):
    return SimulatedExecutors(ex, theta) if is_simulated(ex) else LLMExecutors(ex)


def is_simulated(ex: dict) -> bool:
    return all(ex[m]["backend"] == "simulated" for m in MODEL_NAMES)


class TransformersChat:
    """A local AutoModelForCausalLM with its chat template; greedy (temperature 0) or sampled.
    Many episodes go through one left-padded `generate` call. Token counts are the real ones: the
    prompt's tokens without padding, and the reply's tokens up to and including end-of-sequence."""

    def __init__(self, path: str, max_new_tokens: int, temperature: float, device: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        _quiet_transformers()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
        self.max_new_tokens, self.temperature, self.device = max_new_tokens, temperature, device

    def chat_many(self, batch: list[list[dict]]) -> list[tuple[str, int, int]]:
        import torch
        texts = [self.tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = self.temperature > 0
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                      temperature=self.temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        res = []
        for i in range(len(batch)):
            ids = new[i].tolist()
            if self.tok.eos_token_id in ids:
                ids = ids[:ids.index(self.tok.eos_token_id) + 1]
            res.append((self.tok.decode(ids, skip_special_tokens=True), int(enc["attention_mask"][i].sum()),
                        len(ids)))
        return res


RETRY_AFTER_CAP_S = 60.0  # a server asking for longer is better treated as down


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx then surfaces as an HTTP error naming base_url


class EndpointError(RuntimeError):
    """One-line, actionable failure talking to an executor endpoint."""


def _snippet(raw: bytes, n: int = 200) -> str:
    # Bounded and on one line: these messages land in logs and result tables.
    return " ".join(raw[:n].decode("utf-8", "replace").split())


def _retry_after(value) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):  # absent, or an HTTP-date: use our own backoff
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S) if seconds == seconds else None  # NaN


class OpenAIClient:
    """An OpenAI-compatible /chat/completions endpoint (vLLM, llama.cpp server, hosted APIs), stdlib
    only. The API key is read from the environment variable `api_key_env` at request time; only the
    variable's name is stored, and the key is scrubbed from every error. Token usage comes from the
    response (a server that reports none is an error: the cost would be unknown). Timeouts, bounded
    retries with exponential backoff on 429 / 5xx / dropped connections, and `concurrency` requests
    in flight across episodes."""

    def __init__(self, role: str, base_url: str, model: str,
                 api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, concurrency: int = 8,
                 max_tokens: int = 16, temperature: float = 0.0, sleep=time.sleep):
        self.role, self.base_url, self.model = role, base_url, model
        self.api_key_env = api_key_env  # the variable's name, never its value
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.concurrency, self.max_tokens, self.temperature = concurrency, max_tokens, temperature
        self.sleep = sleep  # injectable so tests can record delays instead of waiting
        self.url = base_url.rstrip("/") + "/chat/completions"

    def __repr__(self):
        return f"OpenAIClient(role={self.role!r}, base_url={self.base_url!r}, model={self.model!r})"

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def _error(self, problem: str) -> EndpointError:
        msg = f"executor {self.role!r}: {problem}"
        key = self._key()
        # A server may echo request headers in its error body: never pass the key on.
        return EndpointError(msg.replace(key, "<redacted>") if key else msg)

    def _http_error(self, code: int, body: bytes) -> EndpointError:
        if code in (401, 403):  # no body here: OpenAI echoes a partly masked key
            fix = (f"check the API key in ${self.api_key_env}" if self._key() else
                   f"no API key was sent: set ${self.api_key_env}" if self.api_key_env else
                   f"no API key was sent: set executors.{self.role}.api_key_env")
        elif code == 404:
            fix = f"check executors.{self.role}.base_url (usually ends in /v1) and model {self.model!r}"
        else:
            fix = f"server said: {_snippet(body)!r}"
        return self._error(f"{self.url} answered HTTP {code}: {fix}")

    def _parse(self, raw: bytes) -> tuple[str, int, int]:
        try:
            data = json.loads(raw)
        except ValueError:  # covers JSONDecodeError and invalid UTF-8
            return self._raise(f"{self.url} answered malformed JSON (first 200 chars: {_snippet(raw)!r})")
        try:
            text = data["choices"][0]["message"].get("content") or ""  # null content = empty reply
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError, AttributeError):
            return self._raise(f"{self.url} answered JSON without a text choices[0].message.content "
                               f"(first 200 chars: {_snippet(raw)!r})")
        usage = data.get("usage")
        tokens = [usage.get(k) if isinstance(usage, dict) else None
                  for k in ("prompt_tokens", "completion_tokens")]
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return self._raise(f"{self.url} did not report token usage (usage.prompt_tokens/"
                               f"completion_tokens), so the cost would be unknown: use a server that does")
        return text, tokens[0], tokens[1]

    def _raise(self, problem: str):
        raise self._error(problem) from None

    def chat(self, messages: list[dict]) -> tuple[str, int, int]:
        body = json.dumps({"model": self.model, "messages": messages,
                           "max_tokens": self.max_tokens, "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        key = self._key()  # read per request so a rotated key is picked up; unset = local server
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if not self.url.startswith(("http://", "https://")):  # a config typo: retrying cannot help
            self._raise(f"bad URL {self.url!r} (not http:// or https://): "
                        f"check executors.{self.role}.base_url")
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        opener = urllib.request.build_opener(_NoRedirect)  # a redirect would carry the key elsewhere
        last, unreachable = "", False
        for attempt in range(self.retries + 1):
            wait = None
            try:
                # timeout bounds each socket operation (connect, each read), not the whole call.
                with opener.open(request, timeout=self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:  # must precede OSError: it is a subclass
                if e.code != 429 and e.code < 500:  # caller's mistake: retrying cannot help
                    try:
                        detail = e.read()
                    except OSError:
                        detail = b""
                    raise self._http_error(e.code, detail) from None
                last, unreachable = f"HTTP {e.code}", False
                wait = _retry_after(e.headers.get("Retry-After")) if e.code == 429 else None
            except OSError as e:
                reason = e.reason if isinstance(e, urllib.error.URLError) else e  # unwrap
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last, unreachable = f"timed out after {self.timeout:g} s", False
                elif isinstance(reason, ConnectionError) and not isinstance(reason, ConnectionRefusedError):
                    last, unreachable = f"connection dropped: {type(reason).__name__}", False
                else:  # refused, DNS failure, no route: the server is not where config says
                    last, unreachable = getattr(reason, "strerror", None) or str(reason), True
            except Exception as e:  # http.client protocol errors (IncompleteRead, BadStatusLine)
                self._raise(f"{self.url} broke the HTTP exchange ({type(e).__name__}: {e})")
            else:
                return self._parse(raw)  # a bad body is deterministic: never retried
            if attempt < self.retries:
                base = self.backoff * 2 ** attempt
                # Jitter keeps parallel workers from retrying in lock-step against one server.
                self.sleep(wait if wait is not None else base + random.uniform(0, 0.1 * base))
        if unreachable:
            self._raise(f"cannot reach {self.url} ({last}) after {self.retries} retries: "
                        f"is the server running? check executors.{self.role}.base_url")
        self._raise(f"{self.url} gave up after {self.retries} retries (last: {last})")

    def chat_many(self, batch: list[list[dict]]) -> list[tuple[str, int, int]]:
        if not batch:
            return []
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(batch))))
        try:
            futures = [pool.submit(self.chat, messages) for messages in batch]
            return [f.result() for f in futures]  # input order; re-raises the first failure
        finally:
            # After a failure, drop queued episodes instead of paying for a run already lost.
            pool.shutdown(wait=True, cancel_futures=True)


# ================================================================================================
# 3. Rollouts: many episodes in lockstep, budget-constrained decoding
# ================================================================================================
class Episode:
    """One (task, rollout seed) played by one routing policy. Holds the public transcript the router
    reads, the hidden simulator state it must not read, and the budget state."""

    def __init__(self, family: str, task_seed: int, rollout_seed: int, stream: int = 0, env=None):
        self.family, self.task_seed, self.rollout_seed = family, task_seed, rollout_seed
        self.env = env or BabyAITextEnv(family)
        self.obs = self.env.reset(task_seed)
        fam = type(self.env).FAMILIES.index(family)
        rng = np.random.default_rng([fam, task_seed, rollout_seed])     # common random numbers
        self.u_correct = rng.random(self.env.max_steps)
        self.u_wrong = rng.integers(0, getattr(self.env, "N_WRONG", 1), self.env.max_steps)
        self.stream = stream
        self.route_rng = np.random.default_rng([fam, task_seed, rollout_seed, 7, stream])
        self.turns: list[tuple[str, str, int]] = []  # (observation, action text, model) so far
        self.recent_errors: list[int] = []
        self.cost, self.n_large, self.done, self.success, self.invalid = 0.0, 0, False, 0.0, 0
        self.decisions: list[int] = []
        self.p_large: list[float] = []
        self.prompts: list[str] = []
        self.budget_exhausted = False

    @property
    def t(self) -> int:
        return self.env.steps

    def summary(self) -> dict:
        return {"family": self.family, "task": self.task_seed, "seed": self.rollout_seed,
                "success": float(self.success), "cost": self.cost, "n_large": self.n_large,
                "invalid": self.invalid,
                "steps": self.t, "decisions": self.decisions, "budget_exhausted": self.budget_exhausted,
                "expert_failures": self.env.expert_failures}


@dataclasses.dataclass
class Budget:
    """Hard per-task budget: at most `large_calls` LARGE steps and `dollars` spent (None = no cap)."""
    large_calls: int | None = None
    dollars: float | None = None

    def __post_init__(self):
        if self.large_calls is not None and self.large_calls < 0:
            raise ConfigError(f"budget large_calls={self.large_calls} is below zero; use >= 0 or null")
        if self.dollars is not None and self.dollars < 0:
            raise ConfigError(f"budget dollars={self.dollars} is below zero; use >= 0 or null")

    def allows(self, ep: Episode, model: int, ex: dict, bound: float | None = None) -> bool:
        """May `model` take the next step? `bound` = the executor's upper bound on its dollars
        (default: the simulated pair's exact step cost)."""
        if model == LARGE and self.large_calls is not None and ep.n_large >= self.large_calls:
            return False
        if self.dollars is None:
            return True
        cost = step_cost(ep.t, model, ex) if bound is None else bound
        return ep.cost + cost <= self.dollars * (1 + 1e-12)

    def text(self, ep: Episode) -> str:
        """The budget state in the router's prompt (dollars in units of 1e-4)."""
        left = "any" if self.large_calls is None else str(self.large_calls - ep.n_large)
        cap = "" if self.dollars is None else f" budget left {(self.dollars - ep.cost) * 1e4:.1f}"
        return f"step {ep.t} spent {ep.cost * 1e4:.1f} large {ep.n_large} left {left}{cap}"


def render_prompt(ep: Episode, budget: Budget, history: int | None = None) -> tuple[str, str]:
    """The router's state, from the public transcript only: (header, body).

    Header: the task and the budget state. Body: the last `history` past turns (observation, action,
    which model acted; None = all) and the current observation. The router reads nothing else: not
    the expert, not the dice. The router then truncates the body from the left to its context, so
    `history` only needs to cover the context (rendering all 128 turns at every step is quadratic).
    """
    header = f"task: {ep.env.mission} . {budget.text(ep)} .\n"
    turns = ep.turns[-history:] if history else ep.turns
    lines = [f"obs: {o.replace(chr(10), ' , ')} . act {MODEL_NAMES[m].upper()}: {a} .\n" for o, a, m in turns]
    lines.append(f"obs: {ep.obs.replace(chr(10), ' , ')} . route:")
    return header, "".join(lines)


def decide(p: float, ep: Episode, policy) -> int:
    """Turn pi(LARGE|s) into a decision: sample (RL, random baselines) or threshold (frontier sweep)."""
    if policy.sample:
        return int(ep.route_rng.random() < p)
    return int(p >= policy.threshold)


def rollout(jobs, policy, ex: dict, theta: dict, budget: Budget | None = None, record: bool = False,
            progress: bool = False, history: int | None = None, env: dict | None = None) -> list[dict]:
    """Play every job (family, task_seed, rollout_seed[, stream]) to the end, all in lockstep.

    Before each step the policy scores every live episode at once (one batched router forward);
    budget-constrained decoding then masks LARGE wherever it would break the cap. If even a SMALL
    step would break a dollar cap, the episode stops there (keeping the progress it made): spend never
    exceeds a cap. Then each executor plays its share of the live episodes in one batch. `env` is the config's `env`
    section (None: BabyAI). At most `env.max_live` episodes are in play at once (one JVM each on
    ScienceWorld); the rest wait their turn.
    """
    budget = budget or Budget()
    execs = make_executors(ex, theta)
    cls, live_cap = env_class(env), (env or {}).get("max_live") or len(jobs)
    pool_key = env_pool_key(env)
    eps, waiting, live = [], [tuple(j) for j in jobs], []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=getattr(policy, "name", "rollout"), leave=False)
    while waiting or live:
        while waiting and len(live) < live_cap:
            job = waiting.pop(0)
            ep = Episode(*job[:3], stream=job[3] if len(job) > 3 else 0, env=_free_env(pool_key, job[0], env))
            ep.job = job
            eps.append(ep)
            live.append(ep)
        if record or getattr(policy, "needs_prompts", False):
            for ep in live:
                ep.cur_prompt = render_prompt(ep, budget, history)
        ps = policy.p_large(live, execs)
        acting = {SMALL: [], LARGE: []}
        for ep, p in zip(live, ps):
            d = decide(float(p), ep, policy)
            if d == LARGE and not budget.allows(ep, LARGE, ex, execs.max_cost(ep, LARGE)):
                d = SMALL                                   # budget-constrained decoding
            if not budget.allows(ep, SMALL, ex, execs.max_cost(ep, SMALL)):  # not even a cheap step fits
                ep.done, ep.budget_exhausted = True, True
                continue
            if record:
                ep.prompts.append(ep.cur_prompt)
                ep.p_large.append(float(p))
            ep.decisions.append(d)
            acting[d].append(ep)
        for d, group in acting.items():                     # one batched call per executor
            for ep, (action, n_prompt, n_completion) in zip(group, execs.act(group, d) if group else []):
                ep.cost += usage_cost(d, n_prompt, n_completion, ex)    # what the executor reports it used
                ep.n_large += d
                ep.turns.append((ep.obs, action, d))
                ep.obs = ep.env.step(action)
                ep.done, ep.success = ep.env.done, ep.env.success
        still = [ep for ep in live if not ep.done]
        for ep in live:
            if ep.done:
                ep.final = ep.summary()   # before the environment serves another job
                if cls is not BabyAITextEnv:  # keep it hot for the next job (a JVM, a game)
                    _ENV_POOL.setdefault(pool_key, []).append(ep.env)
        if bar is not None:
            bar.update(len(live) - len(still))
        live = still
    if bar is not None:
        bar.close()
    out = []
    for ep in eps:
        s = ep.final
        if record:
            s["prompts"], s["p_large"] = ep.prompts, ep.p_large
        out.append(s)
    return out


_ENV_POOL: dict = {}  # (class, env config) -> finished instances, reused (a ScienceWorld JVM takes ~2 s)


def env_pool_key(env_cfg: dict | None) -> tuple:
    """Instances are shared only between runs of the same environment configuration."""
    return env_class(env_cfg), json.dumps(env_cfg, sort_keys=True, default=str)


def _free_env(key, family: str, env_cfg: dict | None):
    if _ENV_POOL.get(key):
        e = _ENV_POOL[key].pop()
        e.family = family
        return e
    return key[0](family, env_cfg or {})


# -- routing policies (picklable specs, built inside worker processes) ---------------------------
class StaticPolicy:
    """always_small (p=0), always_large (p=1), random-p (sampled), first_large-k, replay."""
    needs_prompts = False

    def __init__(self, kind: str, knob=None):
        self.kind, self.knob, self.name = kind, knob, kind
        self.sample, self.threshold = kind == "random", 0.5

    def p_large(self, eps, execs):
        if self.kind == "always_small":
            return np.zeros(len(eps))
        if self.kind == "always_large":
            return np.ones(len(eps))
        if self.kind == "random":
            return np.full(len(eps), float(self.knob))
        if self.kind == "first_large":
            return np.array([float(ep.t < self.knob) for ep in eps])
        if self.kind == "replay":  # knob: {job tuple: decision list}; SMALL past the list's end
            return np.array([float(ep.t < len(d) and d[ep.t]) for ep in eps for d in (self.knob[ep.job],)])
        raise ValueError(self.kind)


class PrivilegedPolicy:
    """Upper bound, not a router: reads the simulator's true p_small(s), p_large(s); LARGE iff the
    gap p_large - p_small >= knob. No router that reads only the text beats it in expectation."""
    needs_prompts, sample, name = False, False, "privileged"

    def __init__(self, knob: float):
        self.threshold = knob

    def p_large(self, eps, execs):
        return np.array([execs.p_correct(ep, LARGE) - execs.p_correct(ep, SMALL) for ep in eps])


def make_policy(spec):
    kind = spec[0]
    if kind == "privileged":
        return PrivilegedPolicy(spec[1])
    if kind == "stratified":
        return StratifiedPolicy(spec[1])
    if kind == "router":
        _, path, state, threshold = spec
        return RouterPolicy(load_router_cached(path, state), threshold)
    return StaticPolicy(kind, spec[1] if len(spec) > 1 else None)


def _worker(args):
    jobs, spec, ex, theta, budget, record, history, env = args
    import torch
    torch.set_num_threads(1)
    return rollout(jobs, make_policy(spec), ex, theta, budget, record, history=history, env=env)


_POOL = None


def pool(n: int):
    global _POOL
    if _POOL is None and n > 1:
        import multiprocessing as mp
        import atexit
        _POOL = mp.get_context("spawn").Pool(n)
        atexit.register(_close_pool)
    return _POOL


def _close_pool():
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL.join()
        _POOL = None


def run(jobs, spec, cfg: dict, theta: dict, budget: Budget | None = None, record: bool = False,
        desc: str | None = None) -> list[dict]:
    """Rollouts of `jobs` under the policy `spec`, split over `cfg.workers` processes (results in
    job order). Chunks interleave families so that the workers finish together."""
    n = max(1, min(cfg["workers"], len(jobs)))
    ex, hist = cfg["executors"], cfg["router"]["history_turns"]
    if n == 1:
        return rollout(jobs, make_policy(spec), ex, theta, budget, record, desc is not None, hist, cfg["env"])
    chunks = max(n, min(len(jobs) // 8, 4 * n))
    parts = [jobs[i::chunks] for i in range(chunks)]
    from tqdm import tqdm
    res = [None] * chunks
    it = pool(n).imap(_worker, [(p, spec, ex, theta, budget, record, hist, cfg["env"]) for p in parts])
    for i, r in enumerate(tqdm(it, total=chunks, desc=desc, leave=False, disable=desc is None)):
        res[i] = r
    out = [None] * len(jobs)
    for i, r in enumerate(res):
        out[i::chunks] = r
    return out


# ================================================================================================
# 4. Boundary training data: calibration, boundary policies, taxonomy, stratified sampling
# ================================================================================================
def task_list(cfg: dict, split: str) -> list[tuple[str, int]]:
    """Tasks are (family, seed). Test seeds start at `test_seed_offset`: disjoint from training."""
    e = cfg["env"]
    if split == "train":
        return [(f, s) for f in e["families"] for s in range(e["train_tasks_per_family"])]
    off = e["test_seed_offset"]
    return [(f, off + s) for f in e["families"] for s in range(e["test_tasks_per_family"])]


def targets_of(cfg: dict, model: str) -> dict:
    """Success targets per family (clipped), or {'all': x} for a pair with only an aggregate figure."""
    lo, hi = cfg["calibration"]["clip"]
    return {k: min(max(v, lo), hi) for k, v in cfg["executors"][model]["targets"].items()}


def calibrate(cfg: dict, log=print) -> dict:
    """Fit theta_{m,f} by bisection so that always-m reaches the published success on training tasks.

    Success rises with theta on average but not monotonically episode by episode (one different action
    changes the rest of a trajectory), so the fit is as good as the sample: within 5 points per family here.
    A pair with only an aggregate figure ('all') gets one theta per model shared by all families.
    """
    c, fams = cfg["calibration"], cfg["env"]["families"]
    jobs_of = {f: [(f, s, r) for s in range(c["tasks_per_family"]) for r in range(c["seeds"])] for f in fams}
    groups = {}  # (model, group) -> families, where group is a family or 'all'
    for m in MODEL_NAMES:
        t = targets_of(cfg, m)
        for g in (["all"] if "all" in t else fams):
            groups[(m, g)] = (fams if g == "all" else [g], t[g])
    lo, hi = {k: c["lo"] for k in groups}, {k: c["hi"] for k in groups}
    sr_lo, sr_hi = {}, {}  # success measured at the current bracket ends
    for it in range(c["iters"]):
        mid = {k: (lo[k] + hi[k]) / 2 for k in groups}
        succ = _calibration_round(cfg, groups, mid, jobs_of)
        for k, (_, target) in groups.items():
            if succ[k] < target:
                lo[k], sr_lo[k] = mid[k], succ[k]
            else:
                hi[k], sr_hi[k] = mid[k], succ[k]
        log(f"calibration iter {it + 1}/{c['iters']}: " + " ".join(
            f"{m[0]}.{g}={succ[(m, g)]:.2f}" for m, g in groups))
    # Final theta: interpolate linearly between the bracket ends where both were measured.
    fit = {}
    for k, (_, target) in groups.items():
        if k in sr_lo and k in sr_hi and sr_hi[k] > sr_lo[k]:
            fit[k] = lo[k] + (target - sr_lo[k]) / (sr_hi[k] - sr_lo[k]) * (hi[k] - lo[k])
        else:
            fit[k] = (lo[k] + hi[k]) / 2
    return _theta_table(groups, fit)


def _theta_table(groups: dict, value: dict) -> dict:
    return {m: {f: value[(mm, g)] for (mm, g), (fs, _) in groups.items() if mm == m for f in fs}
            for m in MODEL_NAMES}


def _calibration_round(cfg, groups, mid, jobs_of) -> dict:
    """Success of always-m for every (model, group) at abilities `mid` (both models in one pass each)."""
    theta, succ = _theta_table(groups, mid), {}
    for m in MODEL_NAMES:
        jobs = [j for (mm, g), (fs, _) in groups.items() if mm == m for f in fs for j in jobs_of[f]]
        res = run(jobs, (f"always_{m}",), cfg, theta)
        for (mm, g), (fs, _) in groups.items():
            if mm == m:
                succ[(m, g)] = float(np.mean([r["success"] for r in res if r["family"] in fs]))
    return succ


def boundary_stats(results_small: list[dict], results_large: list[dict]) -> dict:
    """Per task: success rates s_S, s_L and mean costs C_S, C_L of the K boundary rollouts each."""
    by = {}
    for name, res in (("S", results_small), ("L", results_large)):
        for r in res:
            d = by.setdefault(f"{r['family']}/{r['task']}", {"family": r["family"], "task": r["task"]})
            d.setdefault("succ_" + name, []).append(r["success"])
            d.setdefault("cost_" + name, []).append(r["cost"])
    for d in by.values():
        d["s_S"], d["s_L"] = float(np.mean(d["succ_S"])), float(np.mean(d["succ_L"]))
        d["C_S"], d["C_L"] = float(np.mean(d["cost_S"])), float(np.mean(d["cost_L"]))
    return by


def classify(s_S: float, s_L: float, tau_easy: float, delta: float) -> str:
    """Easy if the cheap model alone is good enough; Hard if the expensive one clearly helps;
    else Intractable (neither boundary solves it: fail cheaply)."""
    if s_S >= tau_easy:
        return "easy"
    if s_L - s_S >= delta:
        return "hard"
    return "intractable"


def strata_jobs(task: tuple[str, int], N: int, per_stratum: int, seed0: int = 0) -> list[tuple]:
    """Stratified sampling: per_stratum rollouts in each stratum p = k/N, k = 0..N. The job's stream
    index encodes k, so the routing coin of each stratum is its own reproducible stream."""
    f, s = task
    return [(f, s, seed0 + r, k) for k in range(N + 1) for r in range(per_stratum)]


def cheapest_success(results: list[dict]) -> dict | None:
    """tau* = argmin_{S(tau)=1} C(tau), or None if nothing succeeded. With partial progress (text
    games) S is the best progress any rollout reached, if above 0: the cheapest way to get that far."""
    best = max((r["success"] for r in results), default=0)
    wins = [r for r in results if best > 0 and r["success"] == best]
    return min(wins, key=lambda r: r["cost"]) if wins else None


def prune_large(best: dict, cfg: dict, theta: dict) -> dict:
    """Local search that makes each tau* cheaper: try its LARGE decisions as SMALL, one at a time, in
    order, on the same dice; keep a flip whenever the trajectory still succeeds at a lower cost.

    `best` maps a job (family, task, seed, stream) to its successful trajectory (summary dict). The
    objective is the sampler's own, argmin_{S(tau)=1} C(tau); stratified sampling alone leaves most of
    a trajectory's LARGE calls where its coin fell, not where they were needed. After pruning, a LARGE
    label marks a step where (with these dice) the cheap model would have erred and the large one did
    not. All tasks advance in lockstep, one candidate flip each per round.
    """
    cur = {job: dict(r) for job, r in best.items()}
    nxt = {job: 0 for job in cur}  # next decision index to try
    while True:
        trial = {}
        for job, r in cur.items():
            i = next((k for k in range(nxt[job], len(r["decisions"])) if r["decisions"][k] == LARGE), None)
            if i is not None:
                trial[job] = (i, r["decisions"][:i] + [SMALL] + r["decisions"][i + 1:])
        if not trial:
            return cur
        jobs = list(trial)
        res = run(jobs, ("replay", {j: d for j, (_, d) in trial.items()}), cfg, theta)
        for job, r in zip(jobs, res):
            i = trial[job][0]
            if r["success"] >= cur[job]["success"] and r["cost"] < cur[job]["cost"]:
                cur[job] = {**cur[job], **r}
            nxt[job] = i + 1


class StratifiedPolicy(StaticPolicy):
    """Each episode routes LARGE with probability p = k/N, k from its job's stream index."""

    def __init__(self, N: int):
        super().__init__("random", None)
        self.N, self.name = N, "stratified"

    def p_large(self, eps, execs):
        return np.array([ep.stream / self.N for ep in eps])


# ================================================================================================
# 5. Router: a causal LM that reads the transcript and emits SMALL or LARGE
# ================================================================================================
# pi(LARGE|s) = softmax(logits[last position, (id_SMALL, id_LARGE)])[1]. The CPU default is a small
# Qwen2-style model trained from scratch with a word-level tokenizer trained on the environment's
# text; a GPU config names any pretrained AutoModelForCausalLM instead (router.pretrained). One path.
LABELS = (" SMALL", " LARGE")


def train_tokenizer(texts, vocab_size: int):
    """Word-level tokenizer on environment text (digits split), wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "SMALL", "LARGE"])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _quiet_transformers() -> None:
    """transformers draws a progress bar per checkpoint load/save: dozens per run, drowning ours."""
    from transformers.utils import logging
    logging.disable_progress_bar()


class Router:
    """Wraps (model, tokenizer): prompt encoding with left truncation, batched pi(LARGE|s)."""

    def __init__(self, model, tok, context: int):
        import torch
        self.model, self.tok, self.context = model, tok, context
        ids = [tok.encode(w, add_special_tokens=False) for w in LABELS]
        if any(len(i) == 0 for i in ids) or ids[0][0] == ids[1][0]:
            raise ConfigError(f"router tokenizer cannot tell the labels {LABELS} apart: {ids}")
        self.label_ids = torch.tensor([ids[0][0], ids[1][0]])
        self.device = next(model.parameters()).device

    @classmethod
    def create(cls, cfg: dict, texts=None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
        _quiet_transformers()
        r = cfg["router"]
        torch.manual_seed(cfg["seed"])
        dtype = getattr(torch, r["dtype"])
        if r["pretrained"]:
            tok = AutoTokenizer.from_pretrained(r["pretrained"])
            model = AutoModelForCausalLM.from_pretrained(r["pretrained"], dtype=dtype)
        else:
            tok = train_tokenizer(texts, r["vocab_size"])
            conf = Qwen2Config(vocab_size=max(tok.get_vocab().values()) + 1, hidden_size=r["hidden"], num_hidden_layers=r["layers"],
                               num_attention_heads=r["heads"], num_key_value_heads=r["kv_heads"],
                               intermediate_size=r["intermediate"], max_position_embeddings=r["context"] + 8,
                               tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
            model = Qwen2ForCausalLM(conf).to(dtype)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return cls(model.to(r["device"]), tok, r["context"])

    @classmethod
    def load(cls, path, device: str | None = None):
        """A saved router, on the device it was trained on (router.device) unless `device` is given."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        _quiet_transformers()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"no router checkpoint at '{path}': run the training stage first")
        meta = json.loads((path / "router.json").read_text())
        device = device or meta.get("device", "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"router '{path}' was trained on {device} but no GPU is visible; "
                              "use a GPU machine or a CPU config (router.device: cpu)")
        if meta.get("scratch_tokenizer"):  # our word-level tokenizer: load the exact tokenizer.json
            from transformers import PreTrainedTokenizerFast
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), pad_token="[PAD]", unk_token="[UNK]")
        else:
            tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device)
        return cls(model, tok, meta["context"])

    def save(self, path, extra: dict | None = None) -> None:
        """save_pretrained into a temp folder, then rename: a checkpoint is whole or absent.
        `extra` (e.g. the optimizer state of an RL checkpoint) goes in the same folder as state.pt."""
        import shutil
        import torch
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tok.save_pretrained(tmp)
        if extra is not None:
            torch.save(extra, tmp / "state.pt")
        scratch = "[PAD]" in self.tok.get_vocab() and self.tok.pad_token == "[PAD]"
        (tmp / "router.json").write_text(json.dumps({"context": self.context, "labels": LABELS,
                                                     "scratch_tokenizer": scratch, "device": str(self.device)}))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)

    def encode(self, prompts: list[tuple[str, str]]) -> list[list[int]]:
        """Token ids of (header, body) prompts, truncated from the left of the body to `context`."""
        heads = self.tok([h for h, _ in prompts], add_special_tokens=False)["input_ids"]
        bodies = self.tok([b for _, b in prompts], add_special_tokens=False)["input_ids"]
        return [h + b[max(0, len(b) - (self.context - len(h))):] for h, b in zip(heads, bodies)]

    def label_logits(self, ids: list[list[int]]):
        """Logits of (SMALL, LARGE) at the last position of each (left-padded) prompt: [B, 2]."""
        import torch
        n = max(len(x) for x in ids)
        pad = self.tok.pad_token_id
        inp = torch.tensor([[pad] * (n - len(x)) + x for x in ids], device=self.device)
        mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids], device=self.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        return out.logits[:, -1, :].index_select(1, self.label_ids.to(self.device)).float()

    def p_large(self, prompts: list[tuple[str, str]], batch: int = 256) -> np.ndarray:
        import torch
        ids = self.encode(prompts)
        out = []
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                out.append(torch.softmax(self.label_logits(ids[i:i + batch]), -1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


_ROUTERS: dict = {}


def load_router_cached(path, state=None) -> Router:
    """Workers keep routers loaded; `state` (a state_dict, e.g. the RL policy of this iteration)
    overrides the checkpoint's weights."""
    key = str(path)
    if key not in _ROUTERS:
        _ROUTERS[key] = Router.load(path)
    r = _ROUTERS[key]
    if state is not None:
        r.model.load_state_dict(state)
    elif getattr(r, "_dirty", False):
        r.model.load_state_dict(Router.load(path).model.state_dict())
    r._dirty = state is not None
    r.model.eval()
    return r


class RouterPolicy:
    """A learned router: LARGE iff pi(LARGE|s) >= threshold, or sampled when threshold is None."""
    needs_prompts, name = True, "router"

    def __init__(self, router: Router, threshold: float | None):
        self.router, self.threshold, self.sample = router, threshold, threshold is None

    def p_large(self, eps, execs):
        return self.router.p_large([ep.cur_prompt for ep in eps])


# ================================================================================================
# 6. Losses: SFT and BoPO
# ================================================================================================
def sft_loss(logits2, labels, large_weight: float = 1.0):
    """Cross-entropy on the label token at every decision: logits2 [B, 2] over (SMALL, LARGE)."""
    import torch
    import torch.nn.functional as F
    w = torch.tensor([1.0, large_weight], device=logits2.device)
    return F.cross_entropy(logits2, labels, weight=w)


def normalized_cost(C, C_L):
    """c_hat(tau) = C(tau) / C_L(x): always-large costs about 1 on every task."""
    return np.asarray(C, dtype=float) / C_L


def task_reward(S, c_hat, lam: float, mode: str = "raw", cls: str = "hard"):
    """r(tau).  raw:   S - lam * c_hat  on every task.
    class (boundary-calibrated cost):  Easy         S - lam * c_hat
                                       Hard         S * (1 - lam * c_hat)   a failure earns nothing for being cheap
                                       Intractable  -lam * c_hat            only the cost counts: fail cheaply"""
    S, c = np.asarray(S, dtype=float), np.asarray(c_hat, dtype=float)
    if mode == "raw" or cls == "easy":
        return S - lam * c
    if cls == "hard":
        return S * (1 - lam * c)
    if cls == "intractable":
        return -lam * c
    raise ValueError(cls)


def boundary_reference(r_small, r_large) -> float:
    """b(x) = max(mean r(always-small), mean r(always-large)): the better static policy on this task.
    With the raw reward this is max(s_S - lam C_S/C_L, s_L - lam)."""
    return float(max(np.mean(r_small), np.mean(r_large)))


def advantages(R, eta: float, sigma_min: float, R_ref=None):
    """Reference-guided advantage of the G rollouts of one task:

        A_i = (R_i - (1 - eta) * mean_j R_j) / (std + sigma_min)

    eta = 0 is the GRPO group baseline (a constant shift of R, such as -b(x), cancels). With eta > 0
    part of the baseline is the boundary policy itself (R is already R = r - b(x)): when every
    rollout of a Hard task fails, all get a negative advantage instead of the cheapest failure being
    rewarded. The std is taken over the group together with the boundary rollouts' R_ref when given,
    so that a group of ties does not blow a small non-zero R up by 1/sigma_min."""
    R = np.asarray(R, dtype=float)
    pool_ = R if R_ref is None else np.concatenate([R, np.asarray(R_ref, dtype=float)])
    return (R - (1 - eta) * R.mean()) / (pool_.std() + sigma_min)


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(logp, logp_old, adv, eps: float):
    """PPO: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A), rho = pi / pi_old on the label taken."""
    import torch
    ratio = torch.exp(logp - logp_old)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)


def k3_kl(logp, logp_ref):
    """k3 estimator of KL(pi || pi_ref) from samples of pi: exp(d) - d - 1, d = log pi_ref - log pi."""
    import torch
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def bopo_loss(logp, logp_old, logp_ref, adv, mask, eps: float, kl_beta: float):
    """Masked mean over decisions of the clipped surrogate + beta * k3 KL to the SFT policy.
    Each decision carries its trajectory's advantage. Returns (loss, stats)."""
    import torch
    surr = clipped_surrogate(logp, logp_old, adv, eps)
    kl = k3_kl(logp, logp_ref)
    loss = masked_mean(surr + kl_beta * kl, mask)
    with torch.no_grad():
        ratio = torch.exp(logp - logp_old)
        stats = {"losses/policy": masked_mean(surr, mask).item(), "losses/kl_ref": masked_mean(kl, mask).item(),
                 "losses/approx_kl": masked_mean((ratio - 1) - (logp - logp_old), mask).item(),
                 "losses/clipfrac": masked_mean(((ratio - 1).abs() > eps).float(), mask).item()}
    return loss, stats


# ================================================================================================
# 7. Metrics: the cost-success frontier
# ================================================================================================
# A method gives points (mean cost C, success SR), one per knob value. Normalise against the two
# boundaries on the same tasks and draws:  c_hat = (C - C_S) / (C_L - C_S),  PGR = (SR - SR_S)/(SR_L - SR_S).
# The frontier is the non-decreasing envelope of the points plus the always-small anchor (every
# router can route all-SMALL), linearly interpolated and flat after its last point.
# AUC = integral of the SR frontier over c_hat in [0, 1]; APGR = the same for PGR (RouteLLM);
# CPT(q) = the least c_hat at which the PGR frontier reaches q.

def envelope(xs, ys, anchor: tuple[float, float]):
    """Non-decreasing (Pareto) envelope: sorted by cost, keep points better than all cheaper ones."""
    pts = sorted(zip([anchor[0], *xs], [anchor[1], *ys]), key=lambda p: (p[0], -p[1]))
    ex, ey = [], []
    for x, y in pts:
        if not ey or y > ey[-1]:
            ex.append(max(x, 0.0))
            ey.append(y)
    return np.array(ex), np.array(ey)


def frontier_area(xs, ys, anchor: tuple[float, float]) -> float:
    """Exact integral over [0, 1] of the interpolated envelope (piecewise linear, so trapezoids)."""
    ex, ey = envelope(xs, ys, anchor)
    grid = np.unique(np.clip(np.concatenate([[0.0, 1.0], ex]), 0, 1))
    return float(np.trapezoid(np.interp(grid, ex, ey), grid))


def cpt(xs, pgr, level: float) -> float | None:
    """Cost (normalised) to reach a PGR level on the interpolated envelope; None if never reached."""
    ex, ey = envelope(xs, pgr, (0.0, 0.0))
    for i in range(len(ex)):
        if ey[i] >= level:
            if i == 0:
                return float(ex[0])
            x0, x1, y0, y1 = ex[i - 1], ex[i], ey[i - 1], ey[i]
            return float(x0 + (level - y0) * (x1 - x0) / (y1 - y0))
    return None


def frontier_metrics(points: list[dict], bounds: dict) -> dict:
    """AUC, APGR, CPT50/80 and cost to match always-large (within 1 point of its success) for one
    method's points, against bounds = {SR_S, SR_L, C_S, C_L} on the same tasks and draws."""
    dC = bounds["C_L"] - bounds["C_S"]
    dS = bounds["SR_L"] - bounds["SR_S"]
    match = [p["mean_cost"] for p in points if p["success_rate"] >= bounds["SR_L"] - 0.01]
    if dC <= 0 or dS <= 0:  # e.g. only putnext tasks: no gap between the boundaries to normalise by
        return {"auc": None, "apgr": None, "cpt50": None, "cpt80": None,
                "cost_to_match_large": min(match) if match else None}
    xs = [(p["mean_cost"] - bounds["C_S"]) / dC for p in points]
    sr = [p["success_rate"] for p in points]
    pgr = [(s - bounds["SR_S"]) / dS for s in sr]
    return {"auc": frontier_area(xs, sr, (0.0, bounds["SR_S"])), "apgr": frontier_area(xs, pgr, (0.0, 0.0)),
            "cpt50": cpt(xs, pgr, 0.5), "cpt80": cpt(xs, pgr, 0.8),
            "cost_to_match_large": min(match) if match else None}


def auroc(score, positive) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties
    counting half: the Mann-Whitney statistic from average ranks. NaN unless both classes occur."""
    score, positive = np.asarray(score, dtype=float), np.asarray(positive, dtype=bool)
    n1, n0 = positive.sum(), (~positive).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    srt = np.sort(score)
    ranks = (np.searchsorted(srt, score, "left") + 1 + np.searchsorted(srt, score, "right")) / 2
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_ci(per_task: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of the mean over tasks, resampling tasks (each task's seeds stay together)."""
    per_task = np.asarray(per_task, dtype=float)
    rng = np.random.default_rng(seed)
    means = per_task[rng.integers(0, len(per_task), (n, len(per_task)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(results: list[dict], classes: dict | None = None) -> dict:
    """Success rate, mean cost, large-call rate of a list of episode summaries (+ per class)."""
    def s(rs):
        steps = sum(r["steps"] for r in rs)
        return {"success_rate": float(np.mean([r["success"] for r in rs])),
                "mean_cost": float(np.mean([r["cost"] for r in rs])),
                "large_call_rate": sum(r["n_large"] for r in rs) / max(steps, 1), "episodes": len(rs)}
    out = s(results)
    if classes:
        out["by_class"] = {}
        for c in ("easy", "hard", "intractable"):
            rs = [r for r in results if classes.get(f"{r['family']}/{r['task']}") == c]
            if rs:
                out["by_class"][c] = s(rs)
    return out


# ================================================================================================
# Script plumbing (shared by synthesize.py, train_sft.py, train_bopo.py, evaluate.py)
# ================================================================================================
def cli(description: str, argv=None) -> dict:
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", default="configs/default.yaml", help="YAML config (see configs/defaults.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set bopo.iters=5 (repeatable)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        fail(str(e))
    d = run_dir(cfg)
    write_json(d / "config.json", cfg)
    return cfg


def entry(main) -> None:
    """Run a script's main; bad input (ConfigError) ends with one line, not a traceback."""
    try:
        main()
    except ConfigError as e:
        fail(str(e))


def record_time(cfg: dict, stage: str, seconds: float) -> None:
    p = run_dir(cfg) / "timing.json"
    t = json.loads(p.read_text()) if p.is_file() else {}
    t[stage] = round(seconds, 1)
    write_json(p, t)

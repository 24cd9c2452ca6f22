"""Stage 4: evaluation on held-out tasks: baselines, learned routers, bounds, hard budgets.

Every method plays the same test tasks with the same rollout seeds (the same dice). Writes
runs/<name>/metrics.json, results.md, frontier.png, budgets.png, training.png. Rollouts are cached
in runs/<name>/eval_cache/, so a killed evaluation resumes where it stopped.

    python evaluate.py --config configs/default.yaml
"""
import shutil
import time

import numpy as np

import bar

EVAL_SEED0 = 500  # rollout seeds of the evaluation: 500, 501, ... (training used others)
ROUTERS = ("sft", "bopo", "grpo", "bopo_no_ref", "bopo_no_boundary", "bopo_no_sft")


class Evaluator:
    def __init__(self, cfg):
        self.cfg, self.d = cfg, bar.run_dir(cfg)
        self.theta = bar.read_json(self.d / "calibration.json")["theta"]
        self.jobs = [(f, s, EVAL_SEED0 + r) for f, s in bar.task_list(cfg, "test") for r in range(cfg["eval"]["seeds"])]
        # Cached rollouts are reused only while what they depend on is unchanged: the test episodes,
        # the simulated pair, the eval settings and every router checkpoint (by modification time).
        cache = self.d / "eval_cache"
        stamp = {"jobs": self.jobs, "theta": self.theta, "env": cfg["env"], "executors": cfg["executors"], "eval": cfg["eval"],
                 "routers": {r: (self.d / r / "model.safetensors").stat().st_mtime
                             for r in ROUTERS if (self.d / r / "model.safetensors").is_file()}}
        stamp = bar.json.loads(bar.json.dumps(stamp))  # as it reads back from disk (tuples -> lists)
        if cache.is_dir() and (not (cache / "stamp.json").is_file() or bar.read_json(cache / "stamp.json") != stamp):
            print(f"evaluation inputs changed since {cache} was written: evaluating afresh")
            shutil.rmtree(cache)
        cache.mkdir(exist_ok=True)
        bar.write_json(cache / "stamp.json", stamp)

    def play(self, key: str, spec, budget=None, jobs=None) -> list[dict]:
        """Rollouts of one method point, cached on disk by key."""
        p = self.d / "eval_cache" / f"{key}.json"
        if p.is_file():
            return bar.read_json(p)
        res = bar.run(jobs or self.jobs, spec, self.cfg, self.theta, budget, desc=key)
        for r in res:
            r.pop("decisions", None)
        bar.write_json(p, res)
        return res


def per_task(res, field="success"):
    by = {}
    for r in res:
        by.setdefault((r["family"], r["task"]), []).append(r[field])
    return np.array([np.mean(v) for v in by.values()])


def main(argv=None):
    cfg = bar.cli(__doc__.splitlines()[0], argv)
    t0 = time.time()
    ev, ec = Evaluator(cfg), cfg["eval"]
    d = ev.d
    routers = [r for r in ROUTERS if (d / r / "router.json").is_file()]
    if "sft" not in routers:
        bar.fail(f"no trained router in '{d}': run `make sft bopo` (or the scripts) first")

    # 1. The boundaries on the test tasks; test-task classes come from them (same rule as training).
    small, large = ev.play("always_small_None", ("always_small",)), ev.play("always_large_None", ("always_large",))
    st = bar.boundary_stats(small, large)
    tax = cfg["taxonomy"]
    classes = {k: bar.classify(v["s_S"], v["s_L"], tax["tau_easy"], tax["delta"]) for k, v in st.items()}
    S0, L0 = bar.summarize(small), bar.summarize(large)
    bounds = {"SR_S": S0["success_rate"], "SR_L": L0["success_rate"], "C_S": S0["mean_cost"], "C_L": L0["mean_cost"]}

    # 2. Every method: a sweep of its knob (one point per value) and a headline point.
    sweeps = {"always_small": [(None, ("always_small",))], "always_large": [(None, ("always_large",))],
              "random": [(p, ("random", p)) for p in ec["random_p"]],
              "first_large": [(k, ("first_large", k)) for k in ec["first_large_k"]]}
    simulated = bar.is_simulated(cfg["executors"])
    if simulated:  # the bounds read the simulator's internals: there are none with real executors
        sweeps["privileged"] = [(th, ("privileged", th)) for th in ec["privileged_thresholds"]]
    for r in routers:
        sweeps[r] = [(th, ("router", str(d / r), None, th)) for th in sorted(set(ec["thresholds"]) | {0.5})]
    headline = {"random": 0.5, "first_large": ec["first_large_budget_k"], "privileged": ec["privileged_headline"]}
    methods, raw = {}, {}
    for name, sweep in sweeps.items():
        pts = []
        for knob, spec in sweep:
            res = ev.play(f"{name}_{knob}", spec)
            s = bar.summarize(res, classes)
            pts.append({"knob": knob, **{k: s[k] for k in ("success_rate", "mean_cost", "large_call_rate")}})
            raw[(name, knob)] = (res, s)
        hk = headline.get(name, 0.5 if name in routers else None)
        if hk not in [k for k, _ in sweep]:
            hk = sweep[len(sweep) // 2][0]
        res, s = raw[(name, hk)]
        methods[name] = {**{k: s[k] for k in ("success_rate", "mean_cost", "large_call_rate")},
                         "success_ci": bar.bootstrap_ci(per_task(res), ec["bootstrap"], cfg["seed"]),
                         "cost_pct_of_large": 100 * s["mean_cost"] / bounds["C_L"], "headline_knob": hk,
                         **bar.frontier_metrics(pts, bounds), "points": pts, "by_class": s["by_class"]}

    # 3. The sampled oracle: per (task, seed), the cheapest success over dense strata with the
    #    evaluation's own dice. It knows the dice: a bound, never a target.
    if simulated:
        N = ec["oracle_N"]
        ojobs = [j + (k,) for j in ev.jobs for k in range(1, N)]
        ores = ev.play("oracle_strata", ("stratified", N), jobs=ojobs)
        cand = {}
        for r in small + large + ores:
            cand.setdefault((r["family"], r["task"], r["seed"]), []).append(r)
        orc = [bar.cheapest_success(v) or min(v, key=lambda r: r["cost"]) for v in cand.values()]
        s = bar.summarize(orc, classes)
        methods["oracle"] = {**{k: s[k] for k in ("success_rate", "mean_cost", "large_call_rate")},
                             "success_ci": bar.bootstrap_ci(per_task(orc), ec["bootstrap"], cfg["seed"]),
                             "cost_pct_of_large": 100 * s["mean_cost"] / bounds["C_L"], "headline_knob": None,
                             **bar.frontier_metrics([s], bounds), "points": [{"knob": None, **{k: s[k] for k in ("success_rate", "mean_cost", "large_call_rate")}}],
                             "by_class": s["by_class"]}

    # 4. Hard budgets: caps on large calls and on dollars; spend must never exceed a cap.
    budgets = []
    caps = [(c, None) for c in ec["large_call_caps"]] + [(None, f * bounds["C_L"]) for f in ec["dollar_caps"]]
    for m in ec["budget_methods"]:
        spec = {"first_large": ("first_large", ec["first_large_budget_k"]), "always_large": ("always_large",)}.get(m)
        if spec is None:
            if m not in routers:
                continue
            spec = ("router", str(d / m), None, 0.5)
        for cl, cd in caps:
            key = f"budget_{m}_{cl}_{cd and round(cd, 8)}"
            if cl is None and cd is None:  # no cap: the very same rollouts as the method's headline point
                key = {"first_large": f"first_large_{ec['first_large_budget_k']}", "always_large": "always_large_None"}.get(m, f"{m}_0.5")
            res = ev.play(key, spec, bar.Budget(cl, cd))
            viol = sum((cl is not None and r["n_large"] > cl) or (cd is not None and r["cost"] > cd * (1 + 1e-9)) for r in res)
            s = bar.summarize(res)
            budgets.append({"method": m, "cap_large_calls": cl, "cap_dollars": cd, "success_rate": s["success_rate"],
                            "mean_cost": s["mean_cost"], "max_cost": max(r["cost"] for r in res),
                            "max_large_calls": max(r["n_large"] for r in res), "violations": int(viol)})

    boundary = bar.read_json(d / "boundary.json")
    timing = bar.read_json(d / "timing.json") if (d / "timing.json").is_file() else {}
    timing["eval"] = round(time.time() - t0, 1)
    metrics = {"config": cfg["name"], "env": cfg["env"]["name"], "simulated_executors": bar.is_simulated(cfg["executors"]),
               "executors": {m: cfg["executors"][m]["name"] for m in bar.MODEL_NAMES},
               "boundaries": {m: {"target": boundary["boundaries"][m]["target"], "measured": boundary["boundaries"][m]["measured"],
                                  "measured_test": bounds["SR_" + m[0].upper()], "per_family": boundary["boundaries"][m]["per_family"]}
                              for m in bar.MODEL_NAMES},
               "bounds": bounds, "train_classes": boundary["classes"],
               "test_classes": {c: sum(v == c for v in classes.values()) for c in ("easy", "hard", "intractable")},
               "sft_labels": boundary["labels"], "episodes_per_point": len(ev.jobs),
               "methods": methods, "budgets": budgets, "timing_s": timing}
    bar.write_json(d / "metrics.json", metrics)
    bar.atomic_write(d / "results.md", results_md(metrics, routers))
    plots(d, metrics, routers)
    bar.record_time(cfg, "eval", time.time() - t0)
    print(results_md(metrics, routers).split("## Hard budgets")[0])
    print(f"eval done in {time.time() - t0:.0f}s -> {d / 'results.md'}, {d / 'metrics.json'}, {d / 'frontier.png'}")


def fmt(x, p=3):
    return "-" if x is None else f"{x:.{p}f}"


def results_md(m: dict, routers) -> str:
    b = m["bounds"]
    L = [f"# Results: `{m['config']}`", ""]
    env = m.get("env", "babyai")
    if m["simulated_executors"]:
        L += [f"**Simulated executor pair** ({m['executors']['small']} -> {m['executors']['large']}, calibrated to "
              f"published {env} success) on the real {env} environment. Not real LLM calls.", ""]
    else:
        L += [f"**Real executors** ({m['executors']['small']} -> {m['executors']['large']}) on {env}.", ""]
    if env != "babyai":
        L += ["`success` is progress: score / max score, 1 if won.", ""]
    L += [f"{m['episodes_per_point']} test episodes per point. Boundaries on training tasks: small "
          f"{m['boundaries']['small']['measured']:.3f} (target {m['boundaries']['small']['target']:.3f}), large "
          f"{m['boundaries']['large']['measured']:.3f} (target {m['boundaries']['large']['target']:.3f}); on test: "
          f"{b['SR_S']:.3f} / {b['SR_L']:.3f}. Test classes: {m['test_classes']}.", "",
          "## Methods (headline point; frontier metrics over the knob sweep)", "",
          "| method | knob | success | 95% CI | cost $/task | % of large | large-call rate | AUC | APGR | CPT50 | CPT80 | cost to match large |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in m["methods"].items():
        L.append(f"| {name} | {r['headline_knob'] if r['headline_knob'] is not None else ''} | {r['success_rate']:.3f} | "
                 f"[{r['success_ci'][0]:.3f}, {r['success_ci'][1]:.3f}] | {r['mean_cost']:.5f} | {r['cost_pct_of_large']:.0f}% | "
                 f"{r['large_call_rate']:.3f} | {fmt(r['auc'])} | {fmt(r['apgr'])} | {fmt(r['cpt50'])} | {fmt(r['cpt80'])} | "
                 f"{fmt(r['cost_to_match_large'], 5)} |")
    L += ["", "`privileged` and `oracle` are bounds, not routers. CPT = normalised cost (0 = always-small, "
          "1 = always-large) at which the frontier reaches 50/80% of the success gap.", "",
          "## By class (headline point: success / cost % of always-large)", "",
          "| method | easy | hard | intractable |", "|---|---|---|---|"]
    for name, r in m["methods"].items():
        cells = []
        for c in ("easy", "hard", "intractable"):
            x = r["by_class"].get(c)
            cells.append("-" if x is None else f"{x['success_rate']:.2f} / {100 * x['mean_cost'] / b['C_L']:.0f}%")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L += ["", "## Hard budgets", "", "| method | large-call cap | dollar cap | success | mean spend | max spend | max large calls | violations |",
          "|---|---|---|---|---|---|---|---|"]
    for r in m["budgets"]:
        L.append(f"| {r['method']} | {'-' if r['cap_large_calls'] is None else r['cap_large_calls']} | "
                 f"{fmt(r['cap_dollars'], 5)} | "
                 f"{r['success_rate']:.3f} | {r['mean_cost']:.5f} | {r['max_cost']:.5f} | {r['max_large_calls']} | {r['violations']} |")
    L += ["", "## Time (s)", "", " ".join(f"{k}: {v}" for k, v in m["timing_s"].items()), ""]
    return "\n".join(L)


def plots(d, m: dict, routers) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    b = m["bounds"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    style = {"random": ("grey", ":"), "first_large": ("tab:brown", ":"), "privileged": ("black", "--"),
             "sft": ("tab:blue", "-"), "bopo": ("tab:red", "-"), "grpo": ("tab:green", "-"),
             "bopo_no_ref": ("tab:orange", "-."), "bopo_no_boundary": ("tab:purple", "-."), "bopo_no_sft": ("tab:pink", "-.")}
    for name, r in m["methods"].items():
        pts = sorted(r["points"], key=lambda p: p["mean_cost"])
        x = [100 * p["mean_cost"] / b["C_L"] for p in pts]
        y = [100 * p["success_rate"] for p in pts]
        if name in ("always_small", "always_large", "oracle"):
            ax.scatter(x, y, s=80, marker={"oracle": "*"}.get(name, "s"), label=name, zorder=5,
                       color={"always_small": "tab:cyan", "always_large": "navy", "oracle": "gold"}[name], edgecolor="k")
        else:
            c, ls = style.get(name, ("k", "-"))
            ax.plot(x, y, ls, marker="o", ms=3, color=c, label=name, lw=2.2 if name == "bopo" else 1.3)
            # The headline point (a router at theta = 0.5): a ringed dot on its sweep.
            ax.scatter([100 * r["mean_cost"] / b["C_L"]], [100 * r["success_rate"]], s=50, color=c,
                       edgecolor="k", zorder=6)
    ax.set_xlabel("mean cost per task, % of always-large (ringed: each method's headline point)")
    ax.set_ylabel("success rate, %")
    ax.set_title(f"Cost-success frontier ({m['config']}, {'simulated executors' if m['simulated_executors'] else 'real'})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    bar.atomic_write(d / "frontier.png", _png(fig))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for meth in dict.fromkeys(r["method"] for r in m["budgets"]):
        rows = [r for r in m["budgets"] if r["method"] == meth and r["cap_dollars"] is None]
        xs = [str(r["cap_large_calls"]) if r["cap_large_calls"] is not None else "none" for r in rows]
        axes[0].plot(xs, [100 * r["success_rate"] for r in rows], "o-", label=meth)
        rows = [r for r in m["budgets"] if r["method"] == meth and r["cap_dollars"] is not None]
        axes[1].plot([100 * r["cap_dollars"] / b["C_L"] for r in rows], [100 * r["success_rate"] for r in rows], "o-", label=meth)
    axes[0].set_xlabel("cap on large calls per task")
    axes[1].set_xlabel("dollar cap, % of always-large mean cost")
    for a in axes:
        a.set_ylabel("success rate, %")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("Hard budgets (budget-constrained decoding; violations: "
                 f"{sum(r['violations'] for r in m['budgets'])})")
    fig.tight_layout()
    bar.atomic_write(d / "budgets.png", _png(fig))
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for v in routers[1:]:
        p = d / f"{v}_log.jsonl"
        if not p.is_file():
            continue
        rows = [bar.json.loads(x) for x in p.read_text().splitlines()]
        it = [r["iter"] for r in rows]
        for a, k in zip(axes, ("success_rate", "large_call_rate", "mean_cost_norm")):
            a.plot(it, [r[k] for r in rows], label=v, color=style.get(v, ("k",))[0])
            a.set_title(f"training rollouts: {k}")
            a.set_xlabel("iteration")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    bar.atomic_write(d / "training.png", _png(fig))
    plt.close(fig)


def _png(fig) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


if __name__ == "__main__":
    bar.entry(main)

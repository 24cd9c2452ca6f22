"""Stage 1: boundary-guided SFT data.

calibrate the simulated pair -> boundary rollouts (always-small, always-large; K each per training task)
-> taxonomy Easy / Hard / Intractable -> stratified sampling on Hard tasks -> cheapest successful
trajectory -> per-decision labels (replayed to render the router's prompts exactly as at inference).

    python synthesize.py --config configs/default.yaml
"""
import time
from collections import Counter

import numpy as np

import bar


def main(argv=None):
    cfg = bar.cli(__doc__.splitlines()[0], argv)
    t0 = time.time()
    d = bar.run_dir(cfg)

    # 1. Fit the simulated pair's abilities to the published success rates (cached per run, and
    #    reused only while the pair, the calibration settings and the families are unchanged).
    fit_on = bar.json.loads(bar.json.dumps({"executors": cfg["executors"], "calibration": cfg["calibration"],
                                            "families": cfg["env"]["families"]}))
    cal = bar.read_json(d / "calibration.json") if (d / "calibration.json").is_file() else {}
    simulated = bar.is_simulated(cfg["executors"])
    if not simulated:
        theta = {}                                   # real executors: nothing to fit
        bar.write_json(d / "calibration.json", {"theta": theta, "fit_on": None})
    elif cal.get("fit_on") == fit_on:
        theta = cal["theta"]
        print(f"calibration: reusing {d / 'calibration.json'}")
    else:
        theta = bar.calibrate(cfg)
        bar.write_json(d / "calibration.json", {"theta": theta, "fit_on": fit_on})

    # 2. Boundary policies on every training task, K rollouts each.
    K, tax = cfg["taxonomy"]["K"], cfg["taxonomy"]
    tasks = bar.task_list(cfg, "train")
    jobs = [(f, s, r) for f, s in tasks for r in range(K)]
    res = {m: bar.run(jobs, (f"always_{m}",), cfg, theta, desc=f"boundary always_{m}") for m in bar.MODEL_NAMES}
    stats = bar.boundary_stats(res["small"], res["large"])
    for st in stats.values():
        st["class"] = bar.classify(st["s_S"], st["s_L"], tax["tau_easy"], tax["delta"])
    boundaries = {}
    for m in bar.MODEL_NAMES:
        fams = cfg["env"]["families"]
        tg = bar.targets_of(cfg, m) if simulated else {}   # targets calibrate the simulated pair only
        meas = {f: float(np.mean([r["success"] for r in res[m] if r["family"] == f])) for f in fams}
        meas["all"] = float(np.mean([r["success"] for r in res[m]]))
        per = {f: tg.get(f, tg.get("all")) for f in fams}
        target_all = tg.get("all", float(np.mean(list(per.values()))) if tg else None)
        boundaries[m] = {"target": target_all, "measured": meas["all"], "per_family":
                         {f: {"target": per[f], "measured": meas[f]} for f in fams}}
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"boundary {m:5s}: success {meas['all']:.3f} (target {fmt(target_all)}); " +
              " ".join(f"{f}={meas[f]:.2f}/{fmt(per[f])}" for f in fams))

    # 3. Stratified sampling on Hard tasks: p = k/N on `per_stratum` dice seeds; per (task, seed)
    #    keep the cheapest success, so each Hard task gives up to `per_stratum` label trajectories.
    hard = [(st["family"], st["task"]) for st in stats.values() if st["class"] == "hard"]
    sp = cfg["sampler"]
    sjobs = [j for t in hard for j in bar.strata_jobs(t, sp["N"], sp["per_stratum"])]
    sres = bar.run(sjobs, ("stratified", sp["N"]), cfg, theta, desc="stratified sampling") if sjobs else []
    by_draw = {}
    for j, r in zip(sjobs, sres):
        r["stream"] = j[3]
        by_draw.setdefault((r["family"], r["task"], r["seed"]), []).append(r)

    # 4. The label trajectories of every task, replayed with prompts recorded.
    chosen, source, hard_best = [], Counter(), {}
    for st in stats.values():
        key = (st["family"], st["task"])
        if st["class"] == "hard":
            bests = [b for r in range(sp["per_stratum"]) if (b := bar.cheapest_success(by_draw.get(key + (r,), [])))]
            source["stratified"] += len(bests)
            if not bests:  # no stratum succeeded on any seed: a successful always-large rollout
                b = bar.cheapest_success([r for r in res["large"] if (r["family"], r["task"]) == key])
                source["always_large" if b else "hard_unsolved"] += 1
                bests = [b] if b else []
            for best in bests:
                job = (key[0], key[1], best["seed"], best.get("stream", 0))
                hard_best[job] = best
                chosen.append((job, best["decisions"], st["class"]))
        else:  # Easy and Intractable: all-SMALL labels (Intractable: fail cheaply), as many draws
            for r0 in [r for r in res["small"] if (r["family"], r["task"]) == key][: sp["per_stratum"]]:
                chosen.append(((key[0], key[1], r0["seed"]), r0["decisions"], st["class"]))
    n_large = sum(sum(r["decisions"]) for r in hard_best.values())
    # Local search: drop the LARGE calls tau* did not need. It replays trajectories on the same dice, so
    # only the simulated pair (real models do not repeat themselves exactly; it would only spend).
    if sp["prune"] and hard_best and simulated:
        pruned = bar.prune_large(hard_best, cfg, theta)
        chosen = [(job, pruned[job]["decisions"] if job in pruned else dec, cls) for job, dec, cls in chosen]
        print(f"pruning tau*: LARGE calls on Hard tasks {n_large} -> {sum(sum(r['decisions']) for r in pruned.values())}, "
              f"mean cost {np.mean([r['cost'] for r in hard_best.values()]):.5f} -> "
              f"{np.mean([r['cost'] for r in pruned.values()]):.5f}")
    replay = {job: dec for job, dec, _ in chosen}
    rep = bar.run([job for job, _, _ in chosen], ("replay", replay), cfg, theta, record=True, desc="replay labels")
    rows, diverged = [], 0
    for (job, dec, cls), r in zip(chosen, rep):
        # The simulated pair replays exactly. A real model may answer differently the second time; then
        # the labels are the replay's own decisions at its own prompts (still that routing's choices).
        assert r["decisions"] == dec or not simulated, "replay diverged: the simulator is not deterministic"
        diverged += r["decisions"] != dec
        for (h, b), lab in zip(r["prompts"], r["decisions"]):
            rows.append({"header": h, "body": b, "label": lab, "family": job[0], "task": job[1], "class": cls})
    bar.atomic_write(d / "sft_data.jsonl", "".join(bar.json.dumps(x) + "\n" for x in rows))

    classes = Counter(st["class"] for st in stats.values())
    labels = Counter(x["label"] for x in rows)
    summary = {"theta": theta, "boundaries": boundaries, "classes": dict(classes), "label_source": dict(source),
               "labels": {"SMALL": labels[0], "LARGE": labels[1]}, "decisions": len(rows),
               "stratified_rollouts": len(sjobs), "replays_diverged": diverged,
               "expert_failures": sum(r["expert_failures"] for rs in (res["small"], res["large"], sres) for r in rs),
               "boundary_steps": sum(r["steps"] for rs in res.values() for r in rs)}
    bar.write_json(d / "boundary.json", {"tasks": list(stats.values()), **summary})
    print(f"classes: {dict(classes)}; hard labels from {dict(source)}; expert fell back to a fresh "
          f"plan {summary['expert_failures']} times in {summary['boundary_steps']} boundary steps")
    print(f"SFT data: {len(rows)} decisions, LARGE share {labels[1] / max(len(rows), 1):.3f} -> {d / 'sft_data.jsonl'}")
    bar.record_time(cfg, "synth", time.time() - t0)
    print(f"synth done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    bar.entry(main)

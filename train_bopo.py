"""Stage 3: Boundary-Guided Policy Optimization (BoPO), and the RL baselines from the same code.

Per iteration: sample tasks (Hard over-represented), G rollouts per task from the current router
(sampled decisions), boundary-relative rewards, reference-guided advantages, then mu epochs of the
clipped surrogate + beta * KL(pi || pi_SFT). Variants (bopo.variants):

    bopo              the method: class-calibrated boundary-relative reward, eta > 0
    grpo              vanilla GRPO: raw reward S - lam*c, group baseline (eta = 0), group std
    bopo_no_ref       eta = 0 (no reference-guided advantage)
    bopo_no_boundary  raw reward, no boundary reference b(x)
    bopo_no_sft       BoPO from a randomly initialised router (no SFT warm start)

Checkpoints every `save_every` iterations; a restarted run resumes from the last one.

    python train_bopo.py --config configs/default.yaml
"""
import json
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

import bar

VARIANTS = {
    "bopo": {},
    "grpo": {"eta": 0.0, "reward": "raw", "boundary_relative": False, "std_with_boundary": False},
    "bopo_no_ref": {"eta": 0.0},
    "bopo_no_boundary": {"reward": "raw", "boundary_relative": False},
    "bopo_no_sft": {"init": "scratch"},
}


def group_advantages(results, st: dict, bc: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rewards and advantages of one task's G rollouts against its boundary statistics `st`."""
    lam, mode, cls = bc["lam"], bc["reward"], st["class"]
    r = bar.task_reward([x["success"] for x in results], bar.normalized_cost([x["cost"] for x in results], st["C_L"]),
                        lam, mode, cls)
    r_ref = np.concatenate([bar.task_reward(st["succ_" + m], bar.normalized_cost(st["cost_" + m], st["C_L"]), lam, mode, cls)
                            for m in ("S", "L")])
    b = bar.boundary_reference(r_ref[: len(st["succ_S"])], r_ref[len(st["succ_S"]):]) if bc["boundary_relative"] else 0.0
    R, R_ref = r - b, r_ref - b
    return bar.advantages(R, bc["eta"], bc["sigma_min"], R_ref if bc["std_with_boundary"] else None), r


def label_logp(router, ids, actions):
    return torch.log_softmax(router.label_logits(ids), -1).gather(1, actions[:, None].to(router.device))[:, 0]


def train_variant(cfg: dict, variant: str, stats: dict, theta: dict) -> None:
    d = bar.run_dir(cfg)
    bc = {**cfg["bopo"], **VARIANTS[variant]}
    fingerprint = {k: v for k, v in bc.items() if k not in ("variants", "save_every")}
    out, ck = d / variant, d / f"{variant}.ckpt"
    # A finished variant or a checkpoint is reused only if it was trained with this very config.
    for folder in (out, ck):
        if (folder / "bopo.json").is_file() and json.loads((folder / "bopo.json").read_text()) != fingerprint:
            print(f"{variant}: bopo config changed since {folder} was written; training afresh")
            shutil.rmtree(folder)
    if (out / "router.json").is_file():
        print(f"{variant}: done already ({out}); delete it to retrain")
        return
    ref = bar.Router.load(d / "sft")
    ref.model.eval()
    policy = bar.Router.load(d / "sft")
    if bc["init"] == "scratch":
        from transformers import AutoModelForCausalLM
        torch.manual_seed(cfg["seed"])
        policy.model = AutoModelForCausalLM.from_config(policy.model.config).to(policy.device, policy.model.dtype)
        ref.model.load_state_dict(policy.model.state_dict())  # KL anchors to the initial policy
    opt = torch.optim.AdamW(policy.model.parameters(), lr=bc["lr"], weight_decay=0.0)
    start, log = 0, d / f"{variant}_log.jsonl"
    if (ck / "state.pt").is_file():  # resume
        policy = bar.Router.load(ck)
        opt = torch.optim.AdamW(policy.model.parameters(), lr=bc["lr"], weight_decay=0.0)
        s = torch.load(ck / "state.pt", weights_only=False)
        opt.load_state_dict(s["opt"])
        if bc["init"] == "scratch":
            ref.model.load_state_dict(s["ref"])
        start = s["iter"]
        print(f"{variant}: resuming at iteration {start} from {ck}")
        if log.is_file():  # drop the rows of iterations after the checkpoint: they are redone
            rows = [r for r in log.read_text().splitlines() if json.loads(r)["iter"] <= start]
            bar.atomic_write(log, "".join(r + "\n" for r in rows))
    elif log.exists():
        log.unlink()

    tasks = list(stats.values())
    hard = [t for t in tasks if t["class"] == "hard"] or tasks
    n_hard = int(round(bc["hard_frac"] * bc["tasks_per_iter"]))
    bar_ = tqdm(range(start, bc["iters"]), desc=variant, initial=start, total=bc["iters"])
    for it in bar_:
        t0 = time.time()
        rng = np.random.default_rng([cfg["seed"], it])
        batch = [hard[i] for i in rng.choice(len(hard), n_hard, replace=len(hard) < n_hard)]
        batch += [tasks[i] for i in rng.choice(len(tasks), bc["tasks_per_iter"] - n_hard, replace=False)]
        # One rollout seed per task and iteration (shared dice within the group: the G rollouts
        # differ only by their routing), G routing streams.
        seed = 10_000 + 100 * cfg["seed"] + it
        jobs = [(t["family"], t["task"], seed, g) for t in batch for g in range(bc["G"])]
        policy.model.eval()
        state = {k: v.detach().cpu() for k, v in policy.model.state_dict().items()}
        res = bar.run(jobs, ("router", str(d / "sft"), state, None), cfg, theta, record=True)
        t_roll = time.time() - t0

        ids, acts, logp_old, adv, rs = [], [], [], [], []
        for k, t in enumerate(batch):
            grp = res[k * bc["G"]:(k + 1) * bc["G"]]
            A, r = group_advantages(grp, t, bc)
            rs.extend(r)
            for a, x in zip(A, grp):
                # A random subset of at most `decisions_per_traj` decisions of each trajectory: ~4x
                # cheaper on long (failed) episodes. Unbiased for the mean over each trajectory's
                # decisions, so trajectories weigh equally, not in proportion to their length.
                n = len(x["decisions"])
                keep = np.sort(rng.choice(n, min(n, bc["decisions_per_traj"]), replace=False))
                ids += policy.encode([x["prompts"][i] for i in keep])
                dec = np.array(x["decisions"])[keep]
                acts += dec.tolist()
                p = np.clip(np.array(x["p_large"])[keep], 1e-6, 1 - 1e-6)
                logp_old += list(np.where(dec == 1, np.log(p), np.log1p(-p)))
                adv += [a] * len(keep)
        dev = policy.device
        acts_t = torch.tensor(acts, device=dev)
        old_t, adv_t = (torch.tensor(x, dtype=torch.float32, device=dev) for x in (logp_old, adv))
        mb = bc["minibatch"]
        with torch.no_grad():
            ref_t = torch.cat([label_logp(ref, ids[i:i + mb], acts_t[i:i + mb]) for i in range(0, len(ids), mb)])
        policy.model.train()
        stats_acc = []
        for _ in range(bc["epochs"]):
            perm = rng.permutation(len(ids))
            for i in range(0, len(perm), mb):
                b = torch.as_tensor(perm[i:i + mb], device=dev)
                logp = label_logp(policy, [ids[j] for j in b.tolist()], acts_t[b])
                loss, st = bar.bopo_loss(logp, old_t[b], ref_t[b], adv_t[b], torch.ones(len(b), device=dev),
                                         bc["clip_eps"], bc["kl_beta"])
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
                opt.step()
                stats_acc.append(st)
        row = {"iter": it + 1, "success_rate": float(np.mean([x["success"] for x in res])),
               "mean_cost_norm": float(np.mean([x["cost"] / t["C_L"] for k, t in enumerate(batch) for x in res[k * bc["G"]:(k + 1) * bc["G"]]])),
               "large_call_rate": float(np.mean([np.mean(x["decisions"]) for x in res])), "reward": float(np.mean(rs)), "decisions": len(acts),
               **{k: float(np.mean([s[k] for s in stats_acc])) for k in stats_acc[0]}, "rollout_s": t_roll, "seconds": time.time() - t0}
        bar.append_jsonl(log, row)
        bar_.set_postfix(sr=f"{row['success_rate']:.2f}", large=f"{row['large_call_rate']:.2f}")
        if (it + 1) % bc["save_every"] == 0 and it + 1 < bc["iters"]:
            policy.model.eval()
            policy.save(ck, extra={"opt": opt.state_dict(), "iter": it + 1,
                                   "ref": ref.model.state_dict() if bc["init"] == "scratch" else None})
            bar.write_json(ck / "bopo.json", fingerprint)
    policy.model.eval()
    policy.save(out)
    bar.write_json(out / "bopo.json", fingerprint)
    shutil.rmtree(ck, ignore_errors=True)


def main(argv=None):
    cfg = bar.cli(__doc__.splitlines()[0], argv)
    t0 = time.time()
    d = bar.run_dir(cfg)
    for v in cfg["bopo"]["variants"]:
        if v not in VARIANTS:
            bar.fail(f"bopo.variants: unknown variant '{v}' (choose from {', '.join(VARIANTS)})")
    if not (d / "sft" / "router.json").is_file():
        bar.fail(f"no SFT router at '{d / 'sft'}': run `python train_sft.py --config ...` (or `make sft`) first")
    stats = {k: v for k, v in ((f"{t['family']}/{t['task']}", t) for t in bar.read_json(d / "boundary.json")["tasks"])}
    theta = bar.read_json(d / "calibration.json")["theta"]
    for v in cfg["bopo"]["variants"]:
        train_variant(cfg, v, stats, theta)
    bar.record_time(cfg, "bopo", time.time() - t0)
    print(f"bopo done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    bar.entry(main)

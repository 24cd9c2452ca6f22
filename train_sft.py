"""Stage 2: boundary-guided SFT of the router (warm start).

Cross-entropy on the label token (SMALL / LARGE) at every decision of the synthesized trajectories,
from the prompt rendered exactly as at inference. Writes runs/<name>/sft/ (save_pretrained) and
runs/<name>/sft_log.jsonl.

    python train_sft.py --config configs/default.yaml
"""
import json
import time

import numpy as np
import torch
from tqdm import tqdm

import bar


def main(argv=None):
    cfg = bar.cli(__doc__.splitlines()[0], argv)
    t0 = time.time()
    d, sc = bar.run_dir(cfg), cfg["sft"]
    path = d / "sft_data.jsonl"
    if not path.is_file():
        bar.fail(f"'{path}' not found: run `python synthesize.py --config ...` (or `make synth`) first")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    torch.manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])

    router = bar.Router.create(cfg, texts=[r["header"] + r["body"] + " SMALL LARGE" for r in rows])
    ids = router.encode([(r["header"], r["body"]) for r in rows])
    labels = torch.tensor([r["label"] for r in rows], device=router.device)
    # Validation split by task, so the score says something about unseen tasks.
    tasks = sorted({(r["family"], r["task"]) for r in rows})
    val_tasks = set(map(tuple, rng.permutation(np.array(tasks, dtype=object))[: max(1, int(len(tasks) * sc["val_frac"]))]))
    val = np.array([(r["family"], r["task"]) in val_tasks for r in rows])
    tr_idx, va_idx = np.flatnonzero(~val), np.flatnonzero(val)
    n_params = sum(p.numel() for p in router.model.parameters())
    n_large = int(labels[tr_idx].sum())
    # LARGE labels are rare (a tau* calls LARGE only where the cheap model's error would have cost the
    # task). Balanced weighting puts the headline threshold pi >= 0.5 at the labels' base rate.
    w = sc["large_weight"] if sc["large_weight"] is not None else (len(tr_idx) - n_large) / max(n_large, 1)
    print(f"router: {n_params / 1e6:.2f}M parameters, vocab {len(router.tok)}, context {router.context}; "
          f"{len(tr_idx)} train / {len(va_idx)} val decisions, LARGE share {labels.float().mean():.3f}, "
          f"LARGE weight {w:.1f}")

    opt = torch.optim.AdamW(router.model.parameters(), lr=sc["lr"], weight_decay=sc["weight_decay"])
    steps = sc["epochs"] * int(np.ceil(len(tr_idx) / sc["batch"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sc["lr"], total_steps=max(steps, 1), pct_start=0.1)
    log = d / "sft_log.jsonl"
    log.write_text("")

    def evaluate():
        router.model.eval()
        with torch.no_grad():
            lg = torch.cat([router.label_logits([ids[i] for i in va_idx[j:j + 256]]) for j in range(0, len(va_idx), 256)])
        y = labels[va_idx]
        router.model.train()
        pred = lg.argmax(-1)
        # Ranking quality, threshold-free: P(score of a LARGE label > score of a SMALL label).
        score, pos = (lg[:, 1] - lg[:, 0]).cpu().numpy(), (y == 1).cpu().numpy()
        auroc = bar.auroc(score, pos)
        return {"val/loss": bar.sft_loss(lg, y, w).item(), "val/acc": (pred == y).float().mean().item(),
                "val/large_recall": ((pred == 1) & (y == 1)).sum().item() / max((y == 1).sum().item(), 1),
                "val/large_pred": (pred == 1).float().mean().item(), "val/auroc": auroc}

    step = 0
    router.model.train()
    bar_ = tqdm(total=steps, desc="sft")
    for epoch in range(sc["epochs"]):
        perm = rng.permutation(tr_idx)
        for j in range(0, len(perm), sc["batch"]):
            b = perm[j:j + sc["batch"]]
            loss = bar.sft_loss(router.label_logits([ids[i] for i in b]), labels[b], w)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(router.model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar_.update(1)
            if step % 20 == 0 or step == steps:
                row = {"step": step, "epoch": epoch, "train/loss": loss.item()}
                if step % 100 == 0 or step == steps:
                    row.update(evaluate())
                bar.append_jsonl(log, row)
                bar_.set_postfix(loss=f"{loss.item():.3f}")
    bar_.close()
    final = evaluate()
    print("sft: " + " ".join(f"{k}={v:.3f}" for k, v in final.items()))
    router.model.eval()
    router.save(d / "sft")
    bar.record_time(cfg, "sft", time.time() - t0)
    print(f"sft done in {time.time() - t0:.0f}s -> {d / 'sft'}")


if __name__ == "__main__":
    bar.entry(main)

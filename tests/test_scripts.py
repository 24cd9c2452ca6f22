"""Every script end to end as a subprocess on configs/smoke.yaml; resume after a kill; error paths."""
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script


def test_pipeline_writes_every_output(smoke_run):
    d, _, logs = smoke_run
    for f in ("config.json", "calibration.json", "boundary.json", "sft_data.jsonl", "sft/model.safetensors",
              "sft_log.jsonl", "bopo/model.safetensors", "grpo/router.json", "bopo_log.jsonl", "metrics.json",
              "results.md", "frontier.png", "budgets.png", "training.png", "timing.json"):
        assert (d / f).is_file(), f
    m = json.loads((d / "metrics.json").read_text())
    assert m["simulated_executors"] is True and "Simulated executor pair" in (d / "results.md").read_text()
    for k in ("small", "large"):
        assert set(m["boundaries"][k]) >= {"target", "measured"}
    for name in ("always_small", "always_large", "random", "first_large", "sft", "bopo", "grpo", "privileged", "oracle"):
        r = m["methods"][name]
        for k in ("success_rate", "success_ci", "mean_cost", "large_call_rate", "auc", "apgr", "cpt50", "cpt80",
                  "cost_to_match_large", "points", "by_class"):
            assert k in r, (name, k)
        assert r["success_ci"][0] <= r["success_rate"] <= r["success_ci"][1]
    assert m["methods"]["always_small"]["large_call_rate"] == 0 and m["methods"]["always_large"]["large_call_rate"] == 1
    assert m["budgets"] and all(b["violations"] == 0 for b in m["budgets"])
    zero = [b for b in m["budgets"] if b["cap_large_calls"] == 0]
    assert zero and all(b["max_large_calls"] == 0 for b in zero)
    assert set(m["timing_s"]) >= {"synth", "sft", "bopo", "eval"}
    rows = [json.loads(x) for x in (d / "bopo_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2] and "losses/clipfrac" in rows[0]
    assert "SFT data:" in logs["synthesize.py"].stdout


def test_bopo_resumes_after_a_kill(smoke_run, tmp_path):
    d, args, _ = smoke_run
    import shutil
    run = tmp_path / "smoke"
    shutil.copytree(d, run, ignore=shutil.ignore_patterns("bopo", "grpo", "*_log.jsonl", "eval_cache"))
    a = ["--config", "configs/smoke.yaml", "--set", f"out_dir={tmp_path}", "--set", "bopo.iters=4",
         "--set", "bopo.variants=[bopo]"]
    p = subprocess.Popen([sys.executable, str(ROOT / "train_bopo.py"), *a], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not (run / "bopo.ckpt" / "state.pt").is_file():
        assert p.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "bopo" / "router.json").exists()
    out = run_script("train_bopo.py", *a).stdout
    assert "resuming at iteration" in out
    rows = [json.loads(x) for x in (run / "bopo_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]  # iterations redone after the kill are logged once
    assert (run / "bopo" / "router.json").is_file() and not (run / "bopo.ckpt").exists()
    # The finished variant is reused as it is, and retrained when its config changes.
    assert "done already" in run_script("train_bopo.py", *a).stdout
    assert "config changed" in run_script("train_bopo.py", *a, "--set", "bopo.iters=1").stdout


@pytest.mark.parametrize("script,args,message", [
    ("synthesize.py", ["--config", "configs/nope.yaml"], "config file 'configs/nope.yaml' not found"),
    ("synthesize.py", ["--config", "configs/smoke.yaml", "--set", "sft.epoch=2"], "unknown config key 'sft.epoch'"),
    ("train_sft.py", ["--config", "configs/smoke.yaml", "--set", "sft.lr=fast"], "config key 'sft.lr' must be a number"),
    ("evaluate.py", ["--config", "configs/smoke.yaml", "--set", "eval.dollar_caps=[-0.5]"], "below zero"),
    ("evaluate.py", ["--config", "configs/smoke.yaml", "--set", "eval.large_call_caps=[-1]"], "non-negative"),
    ("synthesize.py", ["--config", "configs/smoke.yaml", "--set", "env.families=[maze]"], "unknown family 'maze'"),
    ("train_bopo.py", ["--config", "configs/smoke.yaml", "--set", "bopo.eta=2"], "bopo.eta = 2.0 must lie in [0, 1]"),
    ("train_sft.py", ["--config", "configs/smoke.yaml", "--set", "sft.large_weight=-1"], "sft.large_weight = -1"),
    ("train_bopo.py", ["--config", "configs/smoke.yaml", "--set", "bopo.lam=null"], "'bopo.lam' cannot be null"),
    ("train_bopo.py", ["--config", "configs/smoke.yaml", "--set", "bopo.G=2.5"], "'bopo.G' must be a whole number"),
    ("train_bopo.py", ["--config", "configs/smoke.yaml", "--set", "bopo.init=scrach"], "must be 'sft' or 'scratch'"),
    ("synthesize.py", ["--config", "configs/smoke.yaml", "--set", "sampler.N=0"], "sampler.N = 0 must be at least 1"),
    ("train_sft.py", ["--config", "configs/smoke.yaml", "--set", "router.dtype=float17"], "not a torch dtype"),
    ("train_bopo.py", ["--config", "configs/smoke.yaml", "--set", "bopo.variants=[ppo]"], "unknown variant 'ppo'"),
    ("synthesize.py", ["--config", "configs/smoke.yaml", "--set", "nonsense"], "must look like key.sub=value"),
])
def test_bad_input_gives_one_line_error(script, args, message, tmp_path):
    p = run_script(script, *args, "--set", f"out_dir={tmp_path}", check=False)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], p.stderr


@pytest.mark.parametrize("script,message", [("train_sft.py", "sft_data.jsonl' not found"),
                                            ("train_bopo.py", "no SFT router"),
                                            ("evaluate.py", "calibration.json' not found")])
def test_missing_earlier_stage_is_a_clear_error(script, message, tmp_path):
    p = run_script(script, "--config", "configs/smoke.yaml", "--set", f"out_dir={tmp_path}", check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr

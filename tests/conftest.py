import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_script(script, *args, check=True, timeout=600):
    """Run one of the project's scripts as a subprocess, the way a user does."""
    p = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole pipeline on configs/smoke.yaml, once per test session, in a temporary runs/ folder."""
    out = tmp_path_factory.mktemp("runs")
    args = ["--config", "configs/smoke.yaml", "--set", f"out_dir={out}"]
    logs = {s: run_script(s, *args) for s in ("synthesize.py", "train_sft.py", "train_bopo.py", "evaluate.py")}
    return out / "smoke", args, logs

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


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random chat model and tokenizer, made and saved here (no download): enough to drive the
    transformers executor on CPU. Its replies are noise; the tests check the plumbing. Granite, not
    Qwen2: transformers 5 loads a Qwen2 checkpoint's tokenizer as Qwen's byte-level BPE whatever was
    saved, while Granite's loads as saved (our word-level tokenizer)."""
    import torch
    from transformers import GraniteConfig, GraniteForCausalLM

    import bar
    texts = ["turn left turn right go forward pick up drop toggle look around open door to kitchen",
             "You are an agent playing a text game . Task : Valid actions now : Answer with exactly one action"]
    tok = bar.train_tokenizer(texts * 3, 200)
    tok.add_special_tokens({"eos_token": "[EOS]"})
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    torch.manual_seed(0)
    conf = GraniteConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=64, max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_chat")
    GraniteForCausalLM(conf).save_pretrained(path)
    tok.save_pretrained(path)
    return path

"""A merge under an address-space cap smaller than the model: proof that it streams (slow: ~1 GB of disk I/O)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

MODEL_MB = 520  # fp32 weights of the model below


@pytest.mark.slow
def test_merge_runs_under_a_memory_cap_smaller_than_the_model(tmp_path, tiny_model_dir):
    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="32MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, tmp_path / "base" / name)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tmp_path / "base" / name, run / "adapter" / name)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tmp_path / "base"), "dtype": "float32"},
        "recipe": {"name": "lora", "r": 8, "alpha": 16},
        "data": {"datasets": [{"path": str(tmp_path / "base" / "config.json"), "format": "text"}]},
    }))
    del model, peft_model

    # The child measures its address space after imports, then caps it at that + 300 MB,
    # less than the 520 MB model, and runs the action under the cap.
    def capped(action: str) -> subprocess.CompletedProcess:
        script = f"""
import resource, sys
import torch, transformers, peft, safetensors
from transformers import AutoModelForCausalLM
from tunelab.export.merge import merge_run
import gc; gc.collect()
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
cap = vm + 300 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
{action}
"""
        env = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "PATH": "/usr/bin:/bin", "TUNELAB_CACHE": str(tmp_path)}
        # Outside the checkout: its kernels/ folder would shadow the PyPI package transformers imports.
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)

    merged = capped(f"print('bytes', merge_run({str(run)!r}, {str(tmp_path / 'merged')!r}, max_shard_bytes=32 * 2**20)['bytes'])")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert int(merged.stdout.split("bytes")[1]) > MODEL_MB * 2**20 * 0.95
    # Control: loading the whole model, as a naive merge would, does not fit under the same cap.
    naive = capped(f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r}, dtype=torch.float32)")
    assert naive.returncode != 0 and "memory" in naive.stderr.lower(), naive.stderr[-500:]

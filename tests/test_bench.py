"""bench/vs_trl.py --quick: every system runs on the same examples and the output is machine-readable.

A smoke test of the harness, not a measurement: a 4 M-parameter model, 3 steps, one repetition,
one thread per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "vs_trl.py"


def test_vs_trl_quick_runs_every_system_on_the_same_examples(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TUNELAB_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kinds = [line["kind"] for line in lines]
    assert kinds == ["env", "system", "system", "system", "ratios"], kinds

    env_line, *systems, ratios = lines
    assert env_line["versions"]["trl"] and env_line["matmul_peak"]["fp32_gflops"] > 0
    assert env_line["data"]["tokens_max"] <= env_line["data"]["max_length"]
    by_name = {s["system"]: s for s in systems}
    assert set(by_name) == {"trl", "trl_packed", "tunelab"}
    for s in systems:
        assert s["ok"] and s["steps"] == env_line["steps"] == 3, s
        assert s["tokens_per_s"] > 0 and s["peak_rss_mb"] > 0 and s["loss_tokens"] > 0
        assert 0 < s["mfu_fp32"] < 1
        assert s["same_examples_as_prepared"], s["system"]  # each system tokenized the data identically
    # TRL's defaults really are what the benchmark says it measures.
    assert by_name["trl"]["settings"]["autocast"] == "bf16" and by_name["trl"]["settings"]["gradient_checkpointing"]
    assert by_name["trl_packed"]["settings"]["padding_free"]
    assert "fused" in by_name["tunelab"]["settings"]["kernels_report"]
    # Packed TRL and tunelab consume the same rows in the same order: the same tokens and the same first loss.
    assert by_name["tunelab"]["loss_tokens"] == by_name["trl_packed"]["loss_tokens"]
    assert abs(by_name["tunelab"]["first_loss"] - by_name["trl_packed"]["first_loss"]) < 1e-2
    for base in ("vs_trl", "vs_trl_packed"):
        assert set(ratios[base]) >= {"tokens_per_s", "peak_rss", "final_loss_rel_diff", "same_examples"}
        assert ratios[base]["tokens_per_s"] > 0 and ratios[base]["same_examples"]

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


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.append(str(SCRIPT.parent))  # for _workload
    spec.loader.exec_module(module)
    return module


def test_vs_trl_refuses_unknown_settings_and_workload_fields(tmp_path):
    for option, expected in ((["--set", "model.dtyp=float32"], "unknown tunelab setting(s) model.dtyp"),
                             (["--workload", "hiden=64"], "--workload: "),
                             (["--set", "nonsense"], "is not KEY=VALUE")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *option], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr, proc.stderr[-500:]


def test_levers_flip_one_choice_each_against_the_tunelab_settings():
    vs_trl = _bench_module("vs_trl")
    settings = vs_trl.tunelab_settings()
    label, first = vs_trl.LEVERS[0]
    assert first == {} and "all levers" in label
    for label, flipped in vs_trl.LEVERS[1:]:
        assert len(flipped) == 1, label
        (key, value), = flipped.items()
        assert key in settings and settings[key] != value, label  # a real change, of a known setting
    assert vs_trl._assignments(["a=1024", "b=false", "c=float32", "d=null"], "--set") == {
        "a": 1024, "b": False, "c": "float32", "d": None}


def test_scaling_table_gives_each_system_and_the_ratios():
    scaling = _bench_module("scaling")
    assert [p[1] for p in scaling.points("length")] == ["128", "256", "512", "1024", "2048"]
    assert scaling.points("length")[-1][2] == {"max_length": 2048, "median_tokens": 1229, "sigma": 0.3}
    lines = [{"kind": "env", "data": {"tokens_mean": 76.4}, "model": {"parameters": 44_044_800}},
             {"kind": "system", "system": "trl", "ok": True, "tokens_per_s": 100.0, "peak_rss_mb": 3000.0},
             {"kind": "system", "system": "tunelab", "ok": True, "tokens_per_s": 750.0, "peak_rss_mb": 1200.0}]
    text = scaling.table("model", [("44M", lines)], ["trl", "tunelab"])
    assert text.splitlines()[-1] == "| 44.0 M | 100.0 | 3000 | 750.0 | 1200 | 7.5× | 0.40× |"
    text = scaling.table("length", [("128", lines)], ["trl", "tunelab"])
    assert text.splitlines()[-1].startswith("| 128 | 76 | 100.0 |")


def test_scaling_tables_rebuild_from_saved_lines_with_a_ratio_per_peer(tmp_path, capsys):
    scaling = _bench_module("scaling")
    env = {"kind": "env", "steps": 4, "reps": 3, "data": {"tokens_mean": 76.4}, "model": {"parameters": 11_000_000}}
    def system(name: str, speed: float, after_first: float, peak: float, begin: float) -> dict:
        return {"kind": "system", "system": name, "ok": True, "tokens_per_s": speed,
                "tokens_per_s_after_first_step": after_first, "peak_rss_mb": peak, "rss_at_train_begin_mb": begin}

    systems = [system("trl", 100.0, 150.0, 3000.0, 750.0), system("trl_packed", 200.0, 400.0, 2400.0, 750.0),
               system("tunelab", 800.0, 1000.0, 1200.0, 850.0)]
    saved = tmp_path / "scaling.jsonl"
    saved.write_text("".join(json.dumps({"scaling": "model", "point": "11M", **line}) + "\n" for line in [env, *systems]))
    assert scaling.main(["--from", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scaling by model (4 steps, median of 3):")
    assert out.strip().splitlines()[-1] == "| 11.0 M | 100.0 | 3000 | 200.0 | 2400 | 800.0 | 1200 | 8.0× | 0.40× | 4.0× | 0.50× |"
    # Without step 1 and over the RSS at train begin: 1000/150, 350/2250; 1000/400, 350/1650.
    assert scaling.main(["--from", str(saved), "--after-first-step", "--over-baseline"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "tunelab tokens/s after step 1" in lines[1] and "tunelab RSS over train begin MB" in lines[1]
    assert lines[-1] == "| 11.0 M | 150.0 | 2250 | 400.0 | 1650 | 1000.0 | 350 | 6.7× | 0.16× | 2.5× | 0.21× |"


def test_scaling_tables_in_results_md_are_the_ones_the_saved_run_gives(capsys):
    """bench/RESULTS.md must show what the committed raw lines say, not hand-edited figures."""
    scaling = _bench_module("scaling")
    bench = Path(__file__).resolve().parents[1] / "bench"
    saved = str(bench / "scaling-2026-12-04.jsonl")
    assert scaling.main(["--from", saved]) == 0
    assert scaling.main(["--from", saved, "--after-first-step", "--over-baseline"]) == 0
    table_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 * (2 * 2 + 5 + 3)  # per view: two header rows per table, 5 lengths, 3 models
    results = (bench / "RESULTS.md").read_text().splitlines()
    assert [line for line in table_lines if line not in results] == []

"""How tokens/s and peak memory grow with sequence length and model size, tunelab against TRL.

    python bench/scaling.py                      # both tables: lengths 128..2048 and models 11M..150M
    python bench/scaling.py --only length        # or: --only model
    python bench/scaling.py --steps 4 --systems trl,tunelab
    python bench/scaling.py --from bench/scaling-2026-12-04.jsonl   # the tables again, from a saved run
    python bench/scaling.py --from bench/scaling-2026-12-04.jsonl --after-first-step --over-baseline

Each point is one `bench/vs_trl.py` invocation (its own model, data and fresh child processes), so
every figure here is measured exactly as the main comparison is; only the workload changes:

- length: max_length L in 128, 256, 512, 1024, 2048 with examples about 0.6·L tokens long
  (lognormal, sigma 0.3), so both systems really process rows of about L tokens;
- model:  Llamas of about 11 M, 44 M and 150 M parameters (vocab 32000, untied head) at the main
  workload's data (median 100 tokens, max length 512).

Output: the JSON lines of every point on stdout, the two markdown tables on stderr (with --from,
the tables on stdout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VS_TRL = Path(__file__).resolve().parent / "vs_trl.py"

LENGTHS = (128, 256, 512, 1024, 2048)
# (label, workload fields): hidden, layers, heads, KV heads, MLP width; the parameter count is reported by vs_trl.
MODELS = (
    ("11M", {"hidden": 160, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 432}),
    ("44M", {}),
    ("150M", {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "intermediate": 2816}),
)


def points(only: str | None) -> list[tuple[str, str, dict]]:
    out = []
    if only in (None, "length"):
        out += [("length", str(n), {"max_length": n, "median_tokens": round(0.6 * n), "sigma": 0.3}) for n in LENGTHS]
    if only in (None, "model"):
        out += [("model", label, fields) for label, fields in MODELS]
    return out


def run_point(fields: dict, steps: int, reps: int, systems: str) -> list[dict]:
    command = [sys.executable, str(VS_TRL), "--steps", str(steps), "--reps", str(reps), "--systems", systems]
    for key, value in fields.items():
        command += ["--workload", f"{key}={value}"]
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"scaling: vs_trl failed for {fields}: {proc.stderr.strip()[-2000:]}")
    return lines


def table(kind: str, results: list[tuple[str, list[dict]]], systems: list[str],
          after_first_step: bool = False, over_baseline: bool = False) -> str:
    """One markdown row per point: each system's tokens/s and peak RSS, then tunelab ÷ each TRL system.

    ``after_first_step`` times steps 2.. only (a short run otherwise counts warm-up);
    ``over_baseline`` subtracts each run's RSS at train begin (the imported runtime).
    """
    speed = "tokens_per_s_after_first_step" if after_first_step else "tokens_per_s"

    def rss(r: dict) -> float:
        return r["peak_rss_mb"] - (r["rss_at_train_begin_mb"] if over_baseline else 0.0)

    speed_name = "tokens/s after step 1" if after_first_step else "tokens/s"
    rss_name = "RSS over train begin MB" if over_baseline else "peak RSS MB"
    first = "max length" if kind == "length" else "parameters"
    head = [first, "tokens/example (mean)"] if kind == "length" else [first]
    for s in systems:
        head += [f"{s} {speed_name}", f"{s} {rss_name}"]
    peers = [s for s in systems if s != "tunelab"] if "tunelab" in systems else []
    for peer in peers:
        head += [f"tunelab ÷ {peer} {speed_name}", f"tunelab ÷ {peer} RSS"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, lines in results:
        env = next(line for line in lines if line["kind"] == "env")
        by = {line["system"]: line for line in lines if line["kind"] == "system"}
        cells = [label, f"{env['data']['tokens_mean']:.0f}"] if kind == "length" else [f"{env['model']['parameters'] / 1e6:.1f} M"]
        for s in systems:
            r = by.get(s, {})
            cells += [f"{r[speed]:.1f}", f"{rss(r):.0f}"] if r.get("ok") else ["failed", ""]
        ours = by.get("tunelab", {})
        for peer in peers:
            theirs = by.get(peer, {})
            ok = ours.get("ok") and theirs.get("ok")
            cells += [f"{ours[speed] / theirs[speed]:.1f}×", f"{rss(ours) / rss(theirs):.2f}×"] if ok else ["", ""]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_results(path: Path) -> dict[str, list[tuple[str, list[dict]]]]:
    """The points of an earlier run, from the JSON lines it printed (so tables can be rebuilt from the raw file)."""
    results: dict[str, dict[str, list[dict]]] = {"length": {}, "model": {}}
    for text in path.read_text().splitlines():
        if text.startswith("{"):
            line = json.loads(text)
            results[line["scaling"]].setdefault(line["point"], []).append(line)
    return {kind: list(points.items()) for kind, points in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("length", "model"))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions per system and point (default 1)")
    parser.add_argument("--systems", default="trl,trl_packed,tunelab",
                        help="vs_trl.py systems (default trl,trl_packed,tunelab)")
    parser.add_argument("--from", dest="from_file", type=Path, metavar="JSONL",
                        help="print the tables of an earlier run from its saved stdout instead of measuring")
    parser.add_argument("--after-first-step", action="store_true",
                        help="tokens/s from step 2 on (the JSON lines carry both)")
    parser.add_argument("--over-baseline", action="store_true",
                        help="peak RSS minus the RSS at train begin (the imported runtime)")
    args = parser.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    if args.from_file:
        results = read_results(args.from_file)
    else:
        results = {"length": [], "model": []}
        for kind, label, fields in points(args.only):
            print(f"scaling: {kind} {label}", file=sys.stderr, flush=True)
            lines = run_point(fields, args.steps, args.reps, args.systems)
            for line in lines:
                print(json.dumps({"scaling": kind, "point": label, **line}), flush=True)
            results[kind].append((label, lines))
    # Tables go to stdout when rebuilt, to stderr when measuring (stdout then holds the raw lines).
    out = sys.stdout if args.from_file else sys.stderr
    for kind, done in results.items():
        if done:
            env = next(line for line in done[0][1] if line["kind"] == "env")
            print(f"scaling by {kind} ({env['steps']} steps, median of {env['reps']}):\n"
                  + table(kind, done, systems, args.after_first_step, args.over_baseline), file=out)
    return 0

if __name__ == "__main__":
    sys.exit(main())

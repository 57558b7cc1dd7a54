"""The ``tunelab`` command: one entry point, one verb per job.

User errors (``UserError``) print one sentence and exit with status 2; ``--debug``
shows the traceback as well. Heavy libraries are imported inside the verbs so
``tunelab --help`` and ``tunelab recipes`` answer quickly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from tunelab.errors import RunInterrupted, UserError

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # what --nproc relaunches
    if not args.debug:
        _quiet_libraries()
    # Overrides may follow options (`train c.yaml --output d lr=1`): argparse leaves them over.
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.handler(args) or 0
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # every process meets the same error; one says it
            for line in str(exc).splitlines():
                print(f"tunelab: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunInterrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("tunelab: interrupted.", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep the console to tunelab's own lines and one progress bar (``--debug`` keeps it all)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="(transformers|peft|torch)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:  # already imported (in-process use): the variable alone comes too late
        sys.modules["datasets"].disable_progress_bars()
    if shutil.which("nvidia-smi") is None:  # DeepSpeed, when installed, warns on import that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.train.run import train

    config = load_config(args.config, args.overrides)
    # DeepSpeed is always started by a launcher, even for one process (e.g. one GPU with ZeRO-3 offload).
    if (args.nproc > 1 or config.distributed.strategy == "deepspeed") and "WORLD_SIZE" not in os.environ:
        return _launch(args.nproc, args.argv, debug=args.debug)
    output = args.output or config.output_dir or f"runs/{Path(args.config).stem}"
    train(config, output_dir=output, max_steps=args.max_steps, resume=args.resume, overwrite=args.overwrite,
          allow_config_change=args.allow_config_change)
    return 0


def _launch(nproc: int, argv: Sequence[str], debug: bool = False) -> int:
    """Start ``nproc`` training processes on this machine, as ``torchrun --standalone`` would
    (the config was checked first), and return the exit code of the first that failed.

    torchrun's own entry point would add a launcher traceback to every failure, even to a
    one-sentence config error that the processes already printed.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    kept, skip = [], False
    for item in argv:  # the same command line, without --nproc
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    if not debug:
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # One intra-op thread pool per core share, as torchrun sets it.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "tunelab", *kept)
    except ChildFailedError as failed:
        code = failed.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention
    except SignalException as stopped:
        # The launcher passed the signal on; the processes saved a checkpoint and said how to resume.
        return 128 + stopped.sigval
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.pipeline import config_kind, load_pipeline
    from tunelab.synth.config import load_synth_config

    kind = config_kind(args.config)
    if kind == "pipeline":
        stages = load_pipeline(args.config, args.overrides).stages
        print(f"{args.config}: OK (pipeline: {', '.join(f'{s.name} ({s.kind})' for s in stages)})")
    elif kind == "synth":
        synth = load_synth_config(args.config, args.overrides)
        print(f"{args.config}: OK (synth, strategy {synth.strategy.name}, teacher {synth.teacher.path})")
    else:
        config = load_config(args.config, args.overrides)
        print(f"{args.config}: OK (recipe {config.recipe.name}, model {config.model.name_or_path})")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.data.inspect import describe, use_color

    config = load_config(args.config, args.overrides)
    print(describe(config, args.examples, args.split, color=use_color()))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.export.merge import merge_run

    report = merge_run(args.run_dir, args.output, qlora_base=args.qlora_base, max_shard_bytes=args.max_shard_size)
    print(f"tunelab: merged {report['recipe']} run into {report['output']} ({report['bytes'] / 2**20:.1f} MiB in "
          f"{report['shards']} shard(s); loads with AutoModelForCausalLM.from_pretrained, no tunelab or PEFT needed)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tunelab.export.export import export

    report = export(args.source, args.format, args.output, quant=args.quant, qlora_base=args.qlora_base)
    print(f"tunelab: exported {args.source} as {args.format} to {report['output']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.eval.evaluate import evaluate, format_table, to_json

    result = evaluate(args.source, args.data, args.format, args.max_samples, args.max_new_tokens, args.batch_size)
    print(format_table(result), end="")
    if args.json:
        from tunelab.io import atomic_write_text

        atomic_write_text(Path(args.json), to_json(result))
        print(f"tunelab: results saved to {args.json}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.eval.generate import Session

    Session(args.source, args.system, args.max_new_tokens, args.temperature).reply(args.prompt, sys.stdout)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.eval.generate import Session, chat

    chat(Session(args.source, args.system, args.max_new_tokens, args.temperature), sys.stdin)
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from tunelab.recipes import REGISTRY

    for name, recipe in sorted(REGISTRY.items()):
        print(f"{name}: {recipe.description}")
        print(f"    trainable share on an 8B Llama: {recipe.typical_trainable} · mergeable: "
              f"{'yes' if recipe.mergeable() else 'no'} · saves {recipe.artifact}/")
        options = [f"{key}={field.default!r}" for key, field in recipe.Options.model_fields.items() if key != "name"]
        print(f"    options: {', '.join(options) if options else '(none)'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.compare import compare, format_table

    rows = compare(args.configs, args.overrides, Path(args.output))
    print(format_table(rows), end="")
    print(f"tunelab: table saved to {Path(args.output) / 'compare.md'} (all numbers in compare.json)")
    return 0 if all("error" not in row for row in rows) else 1


def _cmd_synth(args: argparse.Namespace) -> int:
    from tunelab.synth.config import load_synth_config
    from tunelab.synth.run import format_report, synthesize

    config = load_synth_config(args.config, args.overrides)
    output = Path(args.output or config.output_dir or f"runs/{Path(args.config).stem}")
    print(format_report(synthesize(config, output), output))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from tunelab.pipeline import load_pipeline, run_pipeline

    run_pipeline(load_pipeline(args.pipeline, args.overrides))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from tunelab.config import load_config
    from tunelab.plan.report import format_report, plan_config, to_json

    result = plan_config(load_config(args.config, args.overrides), args.nproc, args.gpu)
    print(to_json(result) if args.json else format_report(result), end="\n" if args.json else "")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from tunelab.models.tiny import build_tiny_model

    out_dir = Path(args.out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not an empty folder; choose a new OUT_DIR.")
    sizes = {k: v for k, v in vars(args).items() if k in ("hidden_size", "num_layers", "vocab_size", "seed") and v is not None}
    path = build_tiny_model(args.out_dir, **sizes)
    print(f"tunelab: tiny Llama model and tokenizer written to {path}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")

    parser = argparse.ArgumentParser(prog="tunelab", description="Fine-tuning recipe runner for LLMs.", parents=[common])
    parser.set_defaults(debug=os.environ.get("TUNELAB_DEBUG", "0") not in ("", "0", "false", "no"))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", parents=[common], help="train a model from a YAML config")
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="OmegaConf dotlist overrides")
    train.add_argument("--output", help="run directory (default: the config's output_dir, else runs/<config name>)")
    train.add_argument("--max-steps", type=_positive_int, help="cap on optimizer steps")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--nproc", type=_positive_int, default=1,
                       help="train with N processes on this machine (torchrun; gloo on CPU, NCCL on GPUs)")
    train.add_argument("--allow-config-change", action="store_true",
                       help="with --resume: continue even though the config differs from the run's")
    train.set_defaults(handler=_cmd_train)

    validate = verbs.add_parser("validate", parents=[common], help="check a config without training")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*", metavar="key.sub=value")
    validate.set_defaults(handler=_cmd_validate)

    data = verbs.add_parser("data", parents=[common], help="show tokenized examples (trained tokens marked) and data statistics")
    data.add_argument("config")
    data.add_argument("overrides", nargs="*", metavar="key.sub=value")
    data.add_argument("-n", "--examples", type=_positive_int, default=3, help="examples to show (default 3)")
    data.add_argument("--split", choices=["train", "eval"], default="train")
    data.set_defaults(handler=_cmd_data)

    merge = verbs.add_parser("merge", parents=[common], help="fold a run's adapter into its base: a plain HF model folder")
    merge.add_argument("run_dir")
    merge.add_argument("--output", required=True, help="folder to write (must not exist)")
    merge.add_argument("--qlora-base", choices=["dequantized", "original"], default="dequantized",
                       help="QLoRA: merge into the NF4-dequantized base it was trained against (default) or the original weights")
    merge.add_argument("--max-shard-size", type=_size, default=5 * 2**30, help="largest shard, e.g. 5GB (default) or 500MB")
    merge.set_defaults(handler=_cmd_merge)

    export = verbs.add_parser("export", parents=[common], help="write a run or model as GGUF, merged safetensors or a PEFT adapter")
    export.add_argument("source", metavar="MODEL_OR_RUN")
    export.add_argument("--format", choices=["gguf", "safetensors", "peft"], required=True)
    export.add_argument("--output", required=True, help="file (gguf) or folder to write; must not exist")
    export.add_argument("--quant", choices=["f16", "q8_0", "f32"], default="f16", help="GGUF tensor type (default f16)")
    export.add_argument("--qlora-base", choices=["dequantized", "original"], default="dequantized")
    export.set_defaults(handler=_cmd_export)

    evaluate = verbs.add_parser("eval", parents=[common], help="loss, perplexity and answer accuracy on a dataset, next to the base")
    evaluate.add_argument("source", metavar="MODEL_OR_RUN")
    evaluate.add_argument("--data", required=True, help="data file, glob, folder or hub id")
    evaluate.add_argument("--format", default="prompt_completion", help="data format (default prompt_completion)")
    evaluate.add_argument("--max-samples", type=_positive_int, default=200)
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=64)
    evaluate.add_argument("--batch-size", type=_positive_int, default=16)
    evaluate.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    evaluate.set_defaults(handler=_cmd_eval)

    for verb, helptext in (("generate", "answer one prompt, streaming"), ("chat", "interactive chat on stdin")):
        talk = verbs.add_parser(verb, parents=[common], help=helptext)
        talk.add_argument("source", metavar="MODEL_OR_RUN")
        if verb == "generate":
            talk.add_argument("--prompt", required=True)
        talk.add_argument("--system", help="system message")
        talk.add_argument("--max-new-tokens", type=_positive_int, default=256)
        talk.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        talk.set_defaults(handler=_cmd_generate if verb == "generate" else _cmd_chat)

    recipes = verbs.add_parser("recipes", parents=[common], help="list the available recipes")
    recipes.set_defaults(handler=_cmd_recipes)

    compare = verbs.add_parser("compare", parents=[common], help="train several configs and print one comparison table")
    compare.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs (e.g. configs/tiny/*.yaml)")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="key.sub=value",
                         help="override applied to every config (repeatable)")
    compare.add_argument("--output", default="runs/compare", help="folder for the runs and the table (default runs/compare)")
    compare.set_defaults(handler=_cmd_compare)

    synth = verbs.add_parser("synth", parents=[common], help="generate a filtered, deduplicated dataset with a teacher model")
    synth.add_argument("config", help="synth YAML config (see configs/tiny/synth.yaml)")
    synth.add_argument("overrides", nargs="*", metavar="key.sub=value", help="OmegaConf dotlist overrides")
    synth.add_argument("--output", help="folder for data.jsonl and report.json (default: the config's output_dir, "
                       "else runs/<config name>); a rerun into it reuses what was generated")
    synth.set_defaults(handler=_cmd_synth)

    run = verbs.add_parser("run", parents=[common], help="run a pipeline of stages (train, synth, eval); unchanged stages are skipped")
    run.add_argument("pipeline", help="pipeline YAML (see configs/tiny/pipeline.yaml)")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value", help="OmegaConf dotlist overrides of the pipeline file")
    run.set_defaults(handler=_cmd_run)

    plan = verbs.add_parser("plan", parents=[common], help="estimate per-device memory of a run, offline, and whether it fits a GPU")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value")
    plan.add_argument("--gpu", help="GPU to check against: a size (24GB) or a name (A100-80GB, H100-80GB, L4, RTX4090, ...)")
    plan.add_argument("--nproc", type=_positive_int, default=1, help="devices the run is spread over (default 1)")
    plan.add_argument("--json", action="store_true", help="print the estimate as JSON")
    plan.set_defaults(handler=_cmd_plan)

    tiny = verbs.add_parser("tiny-model", parents=[common], help="write a tiny Llama model + tokenizer folder")
    tiny.add_argument("out_dir")
    tiny.add_argument("--hidden-size", type=_positive_int, help="default 128")
    tiny.add_argument("--num-layers", type=_positive_int, help="default 2")
    tiny.add_argument("--vocab-size", type=_positive_int, help="BPE vocabulary target, default 512")
    tiny.add_argument("--seed", type=int, help="weight initialisation seed, default 0")
    tiny.set_defaults(handler=_cmd_tiny_model)
    return parser


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    raise argparse.ArgumentTypeError(f"expected a size such as 500MB or 5GB, got {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())

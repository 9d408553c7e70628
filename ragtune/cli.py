"""`ragtune` command line.

  ragtune train CONFIG.yaml... [key=value...]    train + evaluate one run (run_dir=DIR picks the folder)
  ragtune eval RUN_DIR [key=value...]            re-evaluate a finished run: predictions.jsonl + scores.json
  ragtune list                                   strategies, what they train, whether they need labels
  ragtune data synth --out DIR [--seed N] ...    write the synthetic benchmark
  ragtune data check FILE...                     validate corpus/question files, report every bad row
  ragtune experiment EXPERIMENT.yaml [out=DIR] [key=value...]
  ragtune compare DIR... [--metric em] [--format md|csv] [--plot FILE.png]

Exit codes: 0 ok, 1 failed run or bad data, 2 bad configuration, 3 diverged run, 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def _split_args(args: List[str]):
    files = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return files, overrides


def cmd_train(args: List[str]) -> int:
    from ragtune.config import load_config
    from ragtune.run import STATUS_EXIT, failed_result, train

    files, overrides = _split_args(args)
    if not files:
        print("usage: ragtune train CONFIG.yaml... [key=value...]", file=sys.stderr)
        return 2
    cfg = load_config(files, overrides)
    try:
        result = train(cfg)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}); re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        from ragtune.config import ConfigError
        from ragtune.data import DataError
        from ragtune.modelzoo import ModelLoadError

        if isinstance(e, (ConfigError, DataError, ModelLoadError)):
            raise
        result = failed_result(cfg, e)
        print(result["traceback"], file=sys.stderr)
    if result.get("secondary_process"):
        return STATUS_EXIT[result["status"]]
    _print_result(result)
    return STATUS_EXIT[result["status"]]


def _print_result(result: dict) -> None:
    line = f"{result['strategy']}: {result['status']}"
    if result.get("reason"):
        line += f" ({result['reason']})"
    for split in ("dev", "test"):
        s = result.get(split)
        if s:
            line += f" | {split} EM {s['em']:.3f} F1 {s['f1']:.3f}"
            line += "".join(f" {k} {v:.3f}" for k, v in s.items() if k.startswith("recall@"))
    cost = result.get("cost")
    if cost:
        line += f" | train FLOPs {cost['flops']['total_train']:.3g}"
    print(line)
    print(f"run directory: {result.get('run_dir', '')}")


def cmd_eval(args: List[str]) -> int:
    from ragtune.run import eval_run

    if not args or "=" in args[0] or any("=" not in a for a in args[1:]):
        print("usage: ragtune eval RUN_DIR [key=value...]", file=sys.stderr)
        return 2
    scores = eval_run(args[0], args[1:])
    for split, s in scores.items():
        print(f"{split}: " + " ".join(f"{k} {v:.4f}" for k, v in s.items() if isinstance(v, float)))
    return 0


def cmd_list(args: List[str]) -> int:
    from ragtune.strategies import REGISTRY

    print(f"{'strategy':<14} {'labels':<7} {'trains':<40} summary")
    for name, cls in sorted(REGISTRY.items()):
        labels = "yes" if cls.needs_labels else "no"
        print(f"{name:<14} {labels:<7} {cls.trains_description():<40} {cls.summary}")
    return 0


def cmd_data(args: List[str]) -> int:
    if not args or args[0] not in ("synth", "check"):
        print("usage: ragtune data synth --out DIR [--seed N] ... | ragtune data check FILE...", file=sys.stderr)
        return 2
    if args[0] == "synth":
        from ragtune.data.synth import main_synth

        return main_synth(args[1:]) or 0
    from ragtune.data.check import main_check

    parser = argparse.ArgumentParser(prog="ragtune data check")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--corpus", default=None, help="corpus file to resolve passage ids against")
    ns = parser.parse_args(args[1:])
    return main_check(ns.files, ns.corpus)


def cmd_experiment(args: List[str]) -> int:
    from ragtune.experiment import main_experiment

    return main_experiment(args)


def cmd_compare(args: List[str]) -> int:
    from ragtune.compare import main_compare

    return main_compare(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list, "data": cmd_data,
            "experiment": cmd_experiment, "compare": cmd_compare}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from ragtune.config import ConfigError
    from ragtune.data import DataError
    from ragtune.modelzoo import ModelLoadError

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading progress bars

    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: bad data:\n{e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

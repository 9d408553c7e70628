"""`ragtune` command line.

  ragtune train CONFIG.yaml... [key=value...]    train + evaluate one run (run_dir=DIR picks the folder)
  ragtune eval RUN_DIR... [key=value...]         re-evaluate finished runs (eval.splits=[test], ...)
  ragtune list [NAME|module:Class...]            strategies, what they train, whether they need labels
  ragtune data synth --out DIR [--seed N] ...    write the synthetic benchmark
  ragtune data check FILE...                     validate corpus/question files, report every bad row
  ragtune experiment EXPERIMENT.yaml [out=DIR] [key=value...]
  ragtune compare DIR... [--metric em] [--format md|csv] [--plot FILE.png] [--pair A B] [--kind K]

Exit codes: 0 ok, 1 failed run or bad data (or an unreadable file), 2 bad configuration,
3 diverged run, 75 run directory busy (another process trains it), 130 interrupted.
Errors are one line; `--debug` (or RAGTUNE_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def _split_args(args: List[str]):
    """(paths, key=value overrides): an override's key is a dotted name, so a path that contains
    '=' (grid run directories do: lr-generator=0.001_seed-0) is still a path."""
    overrides = [a for a in args if _OVERRIDE.match(a)]
    return [a for a in args if not _OVERRIDE.match(a)], overrides


def cmd_train(args: List[str]) -> int:
    from ragtune.config import load_config
    from ragtune.run import train_and_evaluate
    from ragtune.rundir import EXIT, exit_code, failed_result

    files, overrides = _split_args(args)
    if not files:
        print("usage: ragtune train CONFIG.yaml... [key=value...]", file=sys.stderr)
        return 2
    cfg = load_config(files, overrides)
    try:
        result = train_and_evaluate(cfg)
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}); re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return EXIT["interrupted"]
    except (ValueError, RuntimeError, OSError) as e:
        from ragtune.config import ConfigError
        from ragtune.data import DataError
        from ragtune.fileio import Busy, CorruptFile
        from ragtune.modelzoo import ModelLoadError

        if isinstance(e, (ConfigError, DataError, ModelLoadError, CorruptFile, Busy)):
            raise
        result = failed_result(cfg, e)  # the traceback is kept in the result
        if debug():
            print(result["traceback"], file=sys.stderr)
    if result.get("secondary_process"):
        return exit_code(result)
    _print_result(result)
    return exit_code(result)


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
    """Each run directory in turn, in this one process (the experiment runner evaluates its
    selected runs on test this way); a bad run directory is reported and the others go on."""
    from ragtune.config import ConfigError
    from ragtune.run import eval_run

    dirs, overrides = _split_args(args)
    if not dirs:
        print("usage: ragtune eval RUN_DIR... [key=value...]", file=sys.stderr)
        return 2
    rc = 0
    for d in dirs:
        try:
            scores = eval_run(d, overrides)
        except ConfigError as e:
            print(f"error: {d}: {e}" if len(dirs) > 1 else f"error: {e}", file=sys.stderr)
            rc = 2
            continue
        where = f"{d} " if len(dirs) > 1 else ""
        for split, s in scores.items():
            print(f"{where}{split}: " + " ".join(f"{k} {v:.4f}" for k, v in s.items() if isinstance(v, float)))
    return rc


def cmd_list(args: List[str]) -> int:
    from ragtune.strategies import REGISTRY, get_strategy

    names = args or sorted(REGISTRY)  # `ragtune list pkg.module:Class` shows a plug-in strategy too
    rows = [
        (name, "yes" if cls.needs_labels else "no", cls.trains_description(), cls.summary)
        for name, cls in ((n, get_strategy(n)) for n in names)
    ]  # from the declarations alone: no model is built
    w = max(len("trains"), *(len(r[2]) for r in rows))
    print(f"{'strategy':<14} {'labels':<7} {'trains':<{w}} summary")
    for name, labels, trains, summary in rows:
        print(f"{name:<14} {labels:<7} {trains:<{w}} {summary}")
    return 0


def cmd_data(args: List[str]) -> int:
    if not args or args[0] not in ("synth", "check"):
        print("usage: ragtune data synth --out DIR [--seed N] ... | ragtune data check FILE...", file=sys.stderr)
        return 2
    if args[0] == "synth":
        return cmd_data_synth(args[1:])
    from ragtune.data.check import main_check

    parser = argparse.ArgumentParser(prog="ragtune data check")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--corpus", default=None, help="corpus file to resolve passage ids against")
    ns = parser.parse_args(args[1:])
    return main_check(ns.files, ns.corpus)


def cmd_data_synth(args: List[str]) -> int:
    """`ragtune data synth --out DIR [--seed N] [--people N] ...`: write the synthetic benchmark."""
    import json

    from ragtune.data.synth import SynthConfig, stats, write

    d = SynthConfig()
    p = argparse.ArgumentParser(prog="ragtune data synth", description="Write the synthetic multi-hop RAG benchmark.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--people", type=int, default=d.n_people)
    for f in ("cities", "companies", "universities", "countries"):
        p.add_argument(f"--{f}", type=int, default=None, help="default: derived from --people")
    p.add_argument("--train", type=int, default=d.n_train)
    p.add_argument("--dev", type=int, default=d.n_dev)
    p.add_argument("--test", type=int, default=d.n_test)
    p.add_argument("--distractors", type=int, default=d.distractors_per_question)
    p.add_argument(
        "--mix",
        type=float,
        nargs=3,
        metavar=("SINGLE", "BRIDGE", "COMPARISON"),
        default=(d.frac_single, d.frac_bridge, d.frac_comparison),
    )
    a = p.parse_args(args)
    try:
        cfg = SynthConfig(
            seed=a.seed,
            n_people=a.people,
            n_cities=a.cities,
            n_companies=a.companies,
            n_universities=a.universities,
            n_countries=a.countries,
            n_train=a.train,
            n_dev=a.dev,
            n_test=a.test,
            distractors_per_question=a.distractors,
            frac_single=a.mix[0],
            frac_bridge=a.mix[1],
            frac_comparison=a.mix[2],
        )
        data = write(cfg, a.out)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {a.out}: {json.dumps(stats(data))}")
    return 0


def cmd_experiment(args: List[str]) -> int:
    from ragtune.experiment.runner import run_experiment
    from ragtune.experiment.spec import load_experiment

    files, overrides = _split_args(args)
    if len(files) != 1:
        print("usage: ragtune experiment EXPERIMENT.yaml [out=DIR] [key=value...]", file=sys.stderr)
        return 2
    return run_experiment(load_experiment(files[0], overrides))


def cmd_compare(args: List[str]) -> int:
    from ragtune.experiment import compare

    p = argparse.ArgumentParser(prog="ragtune compare", description=compare.__doc__.split("\n\n")[1])
    p.add_argument("dirs", nargs="+", help="experiment or run directories")
    p.add_argument("--metric", default="em", help="sort column and significance metric (em, f1, recall@k...)")
    p.add_argument("--split", choices=("test", "dev"), default=None, help="default: test when every row has it")
    p.add_argument("--format", choices=("md", "csv"), default="md")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    p.add_argument("--samples", type=int, default=10000, help="permutation test resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"), help="also test row A vs B")
    p.add_argument(
        "--kind", action="append", default=[], help="paired tests on questions of this kind only (repeatable)"
    )
    ns = p.parse_args(args)
    return compare.compare(ns.dirs, ns.metric, ns.split, ns.format, ns.plot, ns.samples, ns.seed, ns.pair, ns.kind)


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "list": cmd_list,
    "data": cmd_data,
    "experiment": cmd_experiment,
    "compare": cmd_compare,
}


def debug() -> bool:
    return os.environ.get("RAGTUNE_DEBUG", "") not in ("", "0")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["RAGTUNE_DEBUG"] = "1"
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from ragtune.config import ConfigError
    from ragtune.data import DataError
    from ragtune.fileio import Busy, CorruptFile
    from ragtune.modelzoo import ModelLoadError
    from ragtune.rundir import EXIT

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
    except CorruptFile as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Busy as e:
        print(f"error: {e}; it is skipped here (re-run when that process has finished)", file=sys.stderr)
        return EXIT["busy"]
    except Exception as e:  # a bug, not a bad input: one line unless --debug
        if debug():
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate finished runs on chosen splits: `python -m ragtune.exp_eval SPLITS RUN_DIR...`.

What: like `ragtune eval RUN_DIR` (scores.json + predictions[_split].jsonl from config.yaml and
final.pt), but on the splits named here (comma-separated), for several runs in one process.
Why: grid runs are launched with `eval.splits=[dev]` so that selection never sees test; the
experiment runner then evaluates only the selected runs on test with this command (`ragtune
eval` re-uses the run's own eval.splits, i.e. dev only). One process for several runs saves the
interpreter start-up per run.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List


def eval_splits(run_dir: str, splits: List[str]) -> Dict[str, object]:
    from ragtune.run import eval_run

    return eval_run(Path(run_dir), [f"eval.splits=[{','.join(splits)}]"])


def main(argv: List[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m ragtune.exp_eval SPLIT[,SPLIT] RUN_DIR...", file=sys.stderr)
        return 2
    from ragtune.config import ConfigError

    rc = 0
    for run_dir in argv[1:]:
        try:
            scores = eval_splits(run_dir, argv[0].split(","))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            rc = 2
            continue
        for split, s in scores.items():
            print(f"{run_dir} {split}: " + " ".join(f"{k} {v:.4f}" for k, v in s.items() if isinstance(v, float)))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

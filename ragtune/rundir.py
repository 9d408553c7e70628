"""The run directory, owned in one place: its file names, readers and writers, and what they mean.

What: a run directory (`ragtune train ... run_dir=DIR`) holds
  config.yaml        the resolved config (`ragtune train DIR/config.yaml run_dir=NEW` reproduces it)
  metrics.jsonl      one JSON row per logged step ({step, phase, loss, ...}) and per dev evaluation
  checkpoints/       last.pt, for an exact resume
  final.pt           the trained weights, index and data position of a finished run
  predictions[_split].jsonl   per-question predictions (`predictions.jsonl` is test's)
  result.json        strategy, status (ok | failed | diverged) + reason, dev/test scores, cost
  scores.json        scores of a later `ragtune eval`
  log.txt            stdout+stderr when the experiment runner launched the run
Only a result.json marks a run finished; ok and diverged are final, a failed run is retried.
Why one module: the trainer, the evaluator, the experiment runner and `ragtune compare` all read
these files; spelling the names, the status <-> exit-code mapping, the `train.init_from` chain and
the freshness of scores once keeps them from drifting apart. Nothing else names these files.
"""

from __future__ import annotations

import json
import re
import traceback
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from ragtune import fileio

PathLike = Union[str, Path]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.pt"  # inside CHECKPOINTS
TENSORBOARD = "tb"
FINAL = "final.pt"
RESULT = "result.json"
SCORES = "scores.json"
LOG = "log.txt"
LOCK = "train.lock"  # flock-ed by the process training the directory (released by the OS at its death)

# exit codes of `ragtune train`/`eval`; the first three are result.json statuses
EXIT = {"ok": 0, "failed": 1, "bad config": 2, "diverged": 3, "busy": 75, "interrupted": 130}
STATUS_EXIT = {s: EXIT[s] for s in ("ok", "failed", "diverged")}
FINAL_STATUSES = ("ok", "diverged")  # deterministic: re-running would give the same outcome


# ---- paths --------------------------------------------------------------------------------------
def config_path(d: PathLike) -> Path:
    return Path(d) / CONFIG


def metrics_path(d: PathLike) -> Path:
    return Path(d) / METRICS


def checkpoints_dir(d: PathLike) -> Path:
    return Path(d) / CHECKPOINTS


def final_path(d: PathLike) -> Path:
    return Path(d) / FINAL


def result_path(d: PathLike) -> Path:
    return Path(d) / RESULT


def scores_path(d: PathLike) -> Path:
    return Path(d) / SCORES


def log_path(d: PathLike) -> Path:
    return Path(d) / LOG


def predictions_path(d: PathLike, split: str) -> Path:
    """predictions.jsonl for test (what a user reads first), predictions_<split>.jsonl otherwise."""
    return Path(d) / ("predictions.jsonl" if split == "test" else f"predictions_{split}.jsonl")


def is_run_dir(d: PathLike) -> bool:
    """A run was started here (config.yaml or result.json exists)."""
    return config_path(d).exists() or result_path(d).exists()


# ---- status <-> exit code ------------------------------------------------------------------------
def status_of_exit(rc: int) -> str:
    """The status a launcher reports for exit code `rc` (SIGINT's -2 is an interruption)."""
    if rc in (EXIT["interrupted"], -2):
        return "interrupted"
    return next((s for s, c in EXIT.items() if c == rc), "failed")


def exit_code(result: dict) -> int:
    return STATUS_EXIT.get(result.get("status", "failed"), EXIT["failed"])


def lock(d: PathLike) -> fileio.DirLock:
    """The lock that makes one trainer per run directory."""
    return fileio.DirLock(d, LOCK)


# ---- result.json ----------------------------------------------------------------------------------
def read_result(d: PathLike) -> Optional[dict]:
    """result.json's content, None if there is none. Raises ValueError if it is unreadable."""
    p = result_path(d)
    if not p.exists():
        return None
    return fileio.load_json(p)


def finished_result(d: PathLike) -> Optional[dict]:
    """The result of a finished run (ok or diverged), else None; a failed result is removed so the
    run is retried (a crash may be transient; the retry resumes from the checkpoint)."""
    res = read_result(d)
    if res is None:
        return None
    if res.get("status") in FINAL_STATUSES:
        return res
    result_path(d).unlink()
    return None


def write_result(d: PathLike, result: Dict[str, object]) -> None:
    """Atomically (a kill never leaves a torn result.json: it is the 'finished' marker); strict
    JSON (a non-finite number is written as null)."""
    fileio.write_json(result_path(d), result)


def failed_result(cfg, err: BaseException) -> Dict[str, object]:
    """Record a crashed run as failed with its reason (never as a score); returns the result."""
    from omegaconf import OmegaConf

    d = Path(cfg.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    result = {
        "strategy": cfg.strategy.name,
        "status": "failed",
        "reason": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exc(),
        "dev": None,
        "test": None,
        "lr": OmegaConf.to_container(cfg.train.lr),
        "seed": cfg.train.seed,
        "run_dir": str(d),
    }
    write_result(d, result)
    return result


# ---- final.pt, config.yaml ------------------------------------------------------------------------
def read_final(d: PathLike, key: str = "") -> dict:
    """final.pt of a finished run: weights, index and data position (the error names `key`)."""
    from ragtune.config import ConfigError

    src = final_path(d)
    if not src.exists():
        where = f"config key '{key}': " if key else ""
        raise ConfigError(f"{where}no {FINAL} in {d} (the run did not finish successfully)")
    return fileio.load_torch(src)


def write_final(d: PathLike, final: dict) -> None:
    fileio.save_torch(final, final_path(d))


def read_config(d: PathLike):
    """The run's saved config (a DictConfig), None if it has none."""
    from omegaconf import OmegaConf

    p = config_path(d)
    return OmegaConf.load(p) if p.exists() else None


def init_from(d: PathLike) -> Optional[Path]:
    """The run directory this run started from (`train.init_from`), None if none."""
    from omegaconf import OmegaConf

    cfg = read_config(d)
    v = OmegaConf.select(cfg, "train.init_from", default="") if cfg is not None else ""
    return Path(v) if v else None


def init_chain(d: PathLike) -> List[Path]:
    """The run and every run it started from, first phase first (cycles are cut)."""
    out: List[Path] = []
    cur: Optional[Path] = Path(d)
    while cur is not None and cur not in out:
        out.append(cur)
        cur = init_from(cur)
    return out[::-1]


# ---- evaluation files -----------------------------------------------------------------------------
def write_predictions(d: PathLike, split: str, rows: Iterable[dict]) -> None:
    fileio.write_text(predictions_path(d, split), "".join(json.dumps(row) + "\n" for row in rows))


def read_predictions(d: PathLike, split: str) -> Optional[List[dict]]:
    """Per-question rows of `split`, None if the run has no predictions for it."""
    p = predictions_path(d, split)
    if not p.exists():
        return None
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def write_scores(d: PathLike, scores: Dict[str, object]) -> None:
    fileio.write_json(scores_path(d), scores)


def read_scores(d: PathLike) -> Dict[str, dict]:
    """scores.json ({split: scores}) of a later `ragtune eval`; {} if absent (CorruptFile if torn)."""
    p = scores_path(d)
    return fileio.load_json(p) if p.exists() else {}


def scores_fresh(d: PathLike, split: str) -> bool:
    """scores.json holds `split` and is not older than result.json (a re-trained run is re-evaluated)."""
    s, r = scores_path(d), result_path(d)
    if not s.exists() or not r.exists() or s.stat().st_mtime < r.stat().st_mtime:
        return False
    return bool(read_scores(d).get(split))


def all_scores(d: PathLike, result: Optional[dict] = None) -> Dict[str, dict]:
    """{split: scores}: result.json's, updated with those of a fresh scores.json."""
    result = read_result(d) if result is None else result
    out = {s: (result or {}).get(s) for s in ("dev", "test") if (result or {}).get(s)}
    for split, v in read_scores(d).items():
        if v and scores_fresh(d, split):
            out[split] = v
    return out


# ---- progress and logs ----------------------------------------------------------------------------
def metrics_tail(d: PathLike, tail_bytes: int = 16384) -> Optional[dict]:
    """The last training row of metrics.jsonl (one with a `loss`), None if none yet. Reads only the
    end of the file and skips a half-written last line, so it is cheap on a running run."""
    p = metrics_path(d)
    try:
        with open(p, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row:
            return row
    return None


def last_activity(d: PathLike) -> float:
    """mtime of metrics.jsonl (0 if none): which of several launched runs is moving."""
    try:
        return metrics_path(d).stat().st_mtime
    except OSError:
        return 0.0


_BAR = re.compile(r"\d+%\|")


def log_tail(d: PathLike) -> str:
    """Last meaningful lines of a run's log.txt, on one line (the reason of a run killed early)."""
    return text_tail(log_path(d))


def text_tail(p: PathLike, lines: int = 3, width: int = 300) -> str:
    """Last meaningful lines of a log file, progress bars dropped, joined on one line."""
    p = Path(p)
    if not p.exists():
        return "no log"
    text = p.read_text(errors="replace").replace("\r", "\n").splitlines()
    keep = [t.strip() for t in text if t.strip() and not _BAR.search(t)]
    return " | ".join(keep[-lines:])[-width:] or "empty log"

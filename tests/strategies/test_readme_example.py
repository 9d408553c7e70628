"""The example strategy in the README trains as written (plugged in by import path)."""

from __future__ import annotations

import re
import sys

from ragtune import run

from helpers import ROOT, final_weights, tiny_cfg


def test_readme_example_strategy_trains(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text.split("## Writing a strategy", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "my_strategy.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_strategy", None)
    res = run.train_and_evaluate(
        tiny_cfg(tmp_path / "run", "strategy.name=my_strategy:EmaTeacherRAG", "train.steps=2", "eval.splits=[]")
    )
    assert res["status"] == "ok", res.get("reason")
    assert res["cost"]["flops_by_component"]["teacher"]["score"] > 0
    w = final_weights(tmp_path / "run")
    assert any(k.startswith("strategy.teacher.") for k in w)

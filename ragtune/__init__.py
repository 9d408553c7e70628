"""ragtune: fine-tune retrieval-augmented generation pipelines with pluggable strategies and
compare them on the same models, loop, evaluator and compute ledger."""

__version__ = "0.1.0"

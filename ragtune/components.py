"""The component vocabulary, defined once: the built-in parts of every RAG pipeline.

A strategy adds its own part names (`ragtune.strategy.Part`); a phase, a learning rate or a
ledger charge naming anything outside a strategy's vocabulary is an error.
"""

BUILTIN_COMPONENTS = ("query_encoder", "doc_encoder", "generator")

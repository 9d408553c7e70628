"""ragtune.data: domain objects, validated loaders and the synthetic benchmark."""

from .check import check_files, main_check
from .loaders import load_hf, load_passages, load_questions, load_rag_dir, read_records, save_jsonl
from .schema import Corpus, DataError, Passage, Problem, Question, RAGData, hops_parallel, passage_text
from .synth import SynthConfig, generate, load_synth, stats, write

__all__ = [
    "Corpus",
    "DataError",
    "Passage",
    "Problem",
    "Question",
    "RAGData",
    "passage_text",
    "hops_parallel",
    "load_passages",
    "load_questions",
    "load_hf",
    "load_rag_dir",
    "read_records",
    "save_jsonl",
    "check_files",
    "main_check",
    "SynthConfig",
    "generate",
    "write",
    "load_synth",
    "stats",
]

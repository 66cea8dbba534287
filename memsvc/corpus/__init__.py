"""The real-text corpus: English, Chinese, German and Japanese prose, Python code, JSON
records and log lines, split by source into training and held-out evaluation text.

`memsvc corpus build` gathers it (sources.py says from where); `Corpus` reads it.
"""

from memsvc.corpus.reader import Corpus, default_corpus_dir, open_corpus
from memsvc.corpus.sources import KINDS, SPLITS, Split

__all__ = ["KINDS", "SPLITS", "Corpus", "Split", "default_corpus_dir", "open_corpus"]

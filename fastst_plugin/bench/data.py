"""Benchmark data: (query, document) pairs with a real length distribution.

Default: ``fastst_plugin/data/debian-train-8000.jsonl.gz`` (Debian package descriptions: short query,
document of ~85 BERT tokens on average, 99th percentile ~300). Or a user's JSON-lines file (``.jsonl``
or ``.jsonl.gz``; keys ``query``/``document``, or ``anchor``/``positive``, or the first two string
fields), or a folder saved with ``datasets.Dataset.save_to_disk`` (only if ``datasets`` is installed).

``long_docs``: documents made by concatenating consecutive descriptions until each reaches a target
length drawn uniformly from [L/2, L] tokens (L = max_seq_length; ~4.3 characters per BERT token), so
that 1024-2048-token runs see long, still variable-length documents.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(_PKG, "data", "debian-train-8000.jsonl.gz")
CHARS_PER_TOKEN = 4.3


@dataclass
class Pairs:
    queries: list[str]
    documents: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.queries)


def _pick(row: dict) -> tuple[str, str]:
    for a, b in (("query", "document"), ("anchor", "positive"), ("sentence1", "sentence2"), ("question", "answer")):
        if isinstance(row.get(a), str) and isinstance(row.get(b), str):
            return row[a], row[b]
    strings = [v for v in row.values() if isinstance(v, str)]
    if len(strings) < 2:
        raise ValueError(f"a data row needs two text fields, got keys {sorted(row)}")
    return strings[0], strings[1]


def load_pairs(path: str | None = None, limit: int | None = None) -> Pairs:
    path = path or DEFAULT_DATA
    queries: list[str] = []
    docs: list[str] = []
    if os.path.isdir(path):
        try:
            import datasets  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"{path} is a folder (a saved datasets.Dataset?) but `datasets` is not installed") from e
        from datasets import load_from_disk

        ds = load_from_disk(path)
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
            ds = ds[next(iter(ds.keys()))]
        for row in ds:
            q, d = _pick(row)
            queries.append(q)
            docs.append(d)
            if limit and len(queries) >= limit:
                break
    else:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                q, d = _pick(json.loads(line))
                queries.append(q)
                docs.append(d)
                if limit and len(queries) >= limit:
                    break
    if not queries:
        raise ValueError(f"no pairs read from {path}")
    return Pairs(queries, docs, os.path.basename(path))


def long_documents(pairs: Pairs, max_seq_length: int, n: int, seed: int = 0) -> list[str]:
    """``n`` documents of concatenated descriptions, each aiming at U[L/2, L] tokens."""
    rng = random.Random(seed)
    out: list[str] = []
    j = 0
    total = len(pairs.documents)
    for _ in range(n):
        target = rng.uniform(0.5, 1.0) * max_seq_length * CHARS_PER_TOKEN
        parts: list[str] = []
        length = 0
        while length < target:
            d = pairs.documents[j % total]
            j += 1
            parts.append(d)
            length += len(d) + 1
        out.append(" ".join(parts)[: int(target)])
    return out


def batch_texts(pairs: Pairs, batch_size: int, n_batches: int, *, long_docs: bool, max_seq_length: int, offset: int = 0):
    """``n_batches`` lists of (queries, documents), consecutive rows from ``offset`` (wrapping)."""
    need = batch_size * n_batches
    idx = [(offset + i) % len(pairs) for i in range(need)]
    queries = [pairs.queries[i] for i in idx]
    docs = long_documents(pairs, max_seq_length, need) if long_docs else [pairs.documents[i] for i in idx]
    return [
        (queries[b * batch_size : (b + 1) * batch_size], docs[b * batch_size : (b + 1) * batch_size])
        for b in range(n_batches)
    ]


def corpus(pairs: Pairs, n: int, *, long_docs: bool, max_seq_length: int, queries: bool = False) -> list[str]:
    if queries:
        return [pairs.queries[i % len(pairs)] for i in range(n)]
    if long_docs:
        return long_documents(pairs, max_seq_length, n, seed=1)
    return [pairs.documents[i % len(pairs)] for i in range(n)]

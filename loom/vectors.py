"""Vectors of an ``embed`` job: reading them, grouping duplicates, ranking them for a query.

Torch-free (numpy, plus faiss-cpu from the ``vectors`` extra for large sets). The vectors are the
job's float32 ``.npy`` outputs in the store, one per succeeded item; a table of vectors (Parquet
or JSONL with a ``vector`` list column) works too.

    table = vectors.job_vectors(session, store, job_id=job_id, tenant_id=tenant_id)
    groups = vectors.group(table, threshold=vectors.DEFAULT_THRESHOLD)   # exact + near
    vectors.write_groups(groups, Path("groups.parquet"))
    hits = vectors.rank(table, query_vector, k=10)

Grouping: items with the same input sha256 (from lineage) are exact duplicates; items whose
cosine is >= the threshold are near-duplicates; groups are the connected components of both
(union-find), so A~B and B~C put A, B and C in one group. Pairs are found by brute force (numpy
matrix products in blocks) up to ``BRUTE_FORCE_MAX`` vectors, which runs in about a second
(bench/bench_vectors.py), and with a faiss IVF index beyond that (neighbours of each vector,
then the same threshold).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loom.errors import InvalidRequest

# The dedupe threshold the embed head is trained and measured for (pipeline/train_embed.py):
# near-duplicates of loom-shapes scenes land above it, distinct scenes below.
DEFAULT_THRESHOLD = 0.9
BRUTE_FORCE_MAX = 5_000    # vectors: about a second of brute force (bench/bench_vectors.py)
BLOCK = 2048               # rows per matrix product: 2048 x n float32 stays small
INDEX_NEIGHBOURS = 32      # neighbours looked up per vector in the index
INDEX_PROBES = 16          # IVF cells searched per vector
METHODS = ("auto", "brute", "faiss")


@dataclass
class VectorTable:
    """Unit vectors (n, d) float32 and, per row, the item index, a file name and the input's
    sha256 (None when unknown)."""

    vectors: np.ndarray
    indices: list[int]
    files: list[str | None]
    sha256: list[str | None]

    def __len__(self) -> int:
        return len(self.indices)


def normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise InvalidRequest(f"vectors: expected a 2-D array, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.maximum(norms, 1e-12)


def make_table(vectors: Sequence[Any] | np.ndarray, *, indices: Sequence[int] | None = None,
               files: Sequence[str | None] | None = None,
               sha256: Sequence[str | None] | None = None) -> VectorTable:
    n = len(vectors)
    arr = normalise(np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors])
                    if n else np.zeros((0, 0), np.float32))
    return VectorTable(arr, list(indices if indices is not None else range(n)),
                       list(files if files is not None else [None] * n),
                       list(sha256 if sha256 is not None else [None] * n))


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32).reshape(-1)


def job_vectors(session: Any, store: Any, *, job_id: str,
                tenant_id: str | None = None) -> VectorTable:
    """The vectors of an embed job's succeeded items, in index order, read from the store."""
    from loom import exports, jobs, tasks

    job = jobs.get_job(session, job_id=job_id, tenant_id=tenant_id)
    if tasks.get(job.task).output != "vector":
        raise InvalidRequest(f"job {job_id} is a {job.task!r} job; dedupe and search need an "
                             f"embed job (its items have vectors)")
    vecs, idx, files, shas = [], [], [], []
    for row in exports.result_rows(session, job_id=job_id, tenant_id=tenant_id):
        out = row.get("output") or {}
        if row["status"] != "succeeded" or out.get("kind") != "vector":
            continue
        vecs.append(load_npy(store.get(out["storage_key"])))
        idx.append(int(row["index"]))
        files.append(exports.file_name(row))
        shas.append((row.get("lineage") or {}).get("input_sha256"))
    return make_table(vecs, indices=idx, files=files, sha256=shas)


def read_table(path: Path) -> VectorTable:
    """A table of vectors: Parquet or JSONL rows with ``vector`` (a list of floats) and
    optionally ``index``, ``file`` and ``sha256`` (or ``input_sha256``)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    bad = next((i for i, r in enumerate(rows) if not isinstance(r.get("vector"), list)), None)
    if bad is not None:
        raise InvalidRequest(f"{path}: row {bad} has no 'vector' list")
    return make_table([r["vector"] for r in rows],
                      indices=[int(r.get("index", i)) for i, r in enumerate(rows)],
                      files=[r.get("file") for r in rows],
                      sha256=[r.get("sha256") or r.get("input_sha256") for r in rows])


# --- pairs above the threshold ---------------------------------------------------------------


def brute_pairs(v: np.ndarray, threshold: float, block: int = BLOCK
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(i, j, cosine) arrays of every pair i < j with cosine >= threshold, block by block."""
    n = len(v)
    for start in range(0, n, block):
        sims = v[start:start + block] @ v[start:].T          # rows start.., columns start..
        i, j = np.nonzero(sims >= threshold)
        keep = j > i                                           # upper triangle, no self pairs
        i, j = i[keep], j[keep]
        yield i + start, j + start, sims[i, j]


def faiss_pairs(v: np.ndarray, threshold: float, k: int = INDEX_NEIGHBOURS,
                nprobe: int = INDEX_PROBES) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The same pairs from a faiss IVF index (inner product): each vector's k nearest among the
    ``nprobe`` closest cells, filtered by the threshold. Approximate: a pair split across cells
    that are not probed is missed, and a group larger than k joins up through its members.
    IVF, not HNSW: measured faster to build and query here (bench/bench_vectors.py)."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - the extra is missing
        raise InvalidRequest(f"{len(v)} vectors need the vector index: "
                             "pip install 'loom[vectors]' (faiss-cpu)") from None
    v = np.ascontiguousarray(v, dtype=np.float32)
    n, d = v.shape
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 40))   # faiss wants ~40 points per cell
    quantiser = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = v if n <= 64 * nlist else v[np.random.default_rng(0).choice(n, 64 * nlist, False)]
    index.train(sample)
    index.add(v)
    index.nprobe = min(nprobe, nlist)
    sims, nbrs = index.search(v, min(k + 1, n))
    rows = np.repeat(np.arange(n), sims.shape[1]).reshape(sims.shape)
    keep = (nbrs > rows) & (sims >= threshold)
    yield rows[keep], nbrs[keep], sims[keep]


def near_pairs(v: np.ndarray, threshold: float, method: str = "auto"
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    if method not in METHODS:
        raise InvalidRequest(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if method == "faiss" or (method == "auto" and len(v) > BRUTE_FORCE_MAX):
        return faiss_pairs(v, threshold)
    return brute_pairs(v, threshold)


# --- grouping ------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the lowest row stays the root (kept)


@dataclass
class Group:
    """Rows of one duplicate group; ``rows[0]`` (the lowest index) is the one to keep."""

    id: int
    rows: list[int]
    exact: list[bool] = field(default_factory=list)   # same input sha256 as rows[0]
    score: list[float] = field(default_factory=list)  # cosine to rows[0]


def group(table: VectorTable, threshold: float = DEFAULT_THRESHOLD,
          method: str = "auto") -> list[Group]:
    """Duplicate groups (two or more rows each), ordered by their first row."""
    if not -1.0 <= threshold <= 1.0:
        raise InvalidRequest(f"threshold: expected a cosine from -1 to 1, got {threshold}")
    n = len(table)
    uf = _UnionFind(n)
    first_of: dict[str, int] = {}
    for row, sha in enumerate(table.sha256):
        if sha:
            uf.union(first_of.setdefault(sha, row), row)
    if n > 1:
        for i, j, _ in near_pairs(table.vectors, threshold, method):
            for a, b in zip(i.tolist(), j.tolist()):
                uf.union(a, b)
    members: dict[int, list[int]] = {}
    for row in range(n):
        members.setdefault(uf.find(row), []).append(row)
    groups = []
    for rows in sorted((r for r in members.values() if len(r) > 1), key=lambda r: r[0]):
        head = rows[0]
        sims = table.vectors[rows] @ table.vectors[head]
        exact = [bool(table.sha256[r]) and table.sha256[r] == table.sha256[head] for r in rows]
        groups.append(Group(len(groups), rows, exact, [round(float(s), 6) for s in sims]))
    return groups


def group_records(table: VectorTable, groups: list[Group]) -> Iterator[dict[str, Any]]:
    """One record per member: ``{"group", "size", "index", "file", "input_sha256", "keep",
    "match": "first" | "exact" | "near", "score"}`` (score: cosine to the kept member)."""
    for g in groups:
        for pos, row in enumerate(g.rows):
            yield {
                "group": g.id, "size": len(g.rows), "index": table.indices[row],
                "file": table.files[row], "input_sha256": table.sha256[row], "keep": pos == 0,
                "match": "first" if pos == 0 else ("exact" if g.exact[pos] else "near"),
                "score": g.score[pos],
            }


def write_groups(table: VectorTable, groups: list[Group], path: Path) -> int:
    """Write the group records as Parquet (``.parquet``) or JSONL; returns the record count."""
    records = list(group_records(table, groups))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("group", pa.int64()), ("size", pa.int64()), ("index", pa.int64()),
                            ("file", pa.string()), ("input_sha256", pa.string()),
                            ("keep", pa.bool_()), ("match", pa.string()),
                            ("score", pa.float64())])
        pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    else:
        with path.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(records)


# --- ranking ---------------------------------------------------------------------------------


def rank(table: VectorTable, query: Any, k: int = 10) -> list[tuple[int, float]]:
    """The k rows most similar to ``query`` (cosine), best first: [(row, score)]."""
    if k < 1:
        raise InvalidRequest(f"k: expected at least 1, got {k}")
    if not len(table):
        return []
    q = normalise(np.asarray(query, dtype=np.float32).reshape(1, -1))[0]
    if q.shape[0] != table.vectors.shape[1]:
        raise InvalidRequest(f"query has {q.shape[0]} dimensions, the vectors "
                             f"{table.vectors.shape[1]}")
    scores = table.vectors @ q
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return [(int(r), float(scores[r])) for r in top]


__all__ = [
    "BRUTE_FORCE_MAX", "DEFAULT_THRESHOLD", "METHODS", "Group", "VectorTable", "group",
    "group_records", "job_vectors", "load_npy", "make_table", "near_pairs", "normalise", "rank",
    "read_table", "write_groups",
]

"""An embedding index of a site's images: vectors in usearch (HNSW, f16 or i8), metadata in SQLite (WAL).

An index is a folder: `index.sqlite` and `vectors.usearch`. SQLite is the source of truth. Each `add` commits its
rows together with their vectors in a `pending` table before the vectors go into the HNSW graph in memory; the graph
file is written (to a temporary name, then renamed) at `checkpoint` and `close`, and only then are the pending
vectors dropped. On open the graph is checked against SQLite: keys it has that SQLite does not (a kill between the
two) are removed, pending vectors it lacks are added. So a kill -9 at any point loses nothing that was committed and
leaves no orphan. One process writes an index at a time (a lock); others may open it to search only: they map the
graph file, search the committed vectors it does not hold yet exactly beside it, and answer only rows SQLite holds,
so a server searches what a listener adds, as it adds it.

No patient identifiers are stored: DICOM UIDs, modality, body part, study date, labels, and a salted hash of the
Patient ID (the salt is the site's, kept outside the index; the index keeps only a fingerprint of it, to refuse
another salt) so a patient's data can be found and deleted. `remove` deletes for real: rows deleted with SQLite's
secure_delete, the database vacuumed and its WAL truncated, vectors removed and the graph rebuilt without them.

An index records the bundle that made its vectors (the manifest's digest and its preprocessing) and refuses
vectors from another: embeddings of two builds are not comparable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medc.errors import MedcError

DB_NAME = "index.sqlite"
VECTORS_NAME = "vectors.usearch"
FORMAT = 1
DTYPES = ("f16", "i8")
# HNSW parameters (benchmarks/results/ann-usearch-1152d*.md, clustered 1152-d vectors): at 1M, f16 reaches recall@10
# 0.95 at expansion_search 128, 0.977-0.981 at 256 (two builds), 0.984 at 384 (1.22 ms p50), 0.987 at 512.
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 384
EXACT_BELOW = 20_000  # a filter that leaves at most this many items is searched exactly, not through the graph
# i8: usearch casts a vector to int8 as trunc(127 x); a unit 1152-d vector's components are ~0.03, which leaves a few
# levels and recall@10 0.62. Each vector is scaled by 1 / max|x| first (cosine does not change), which uses the whole
# int8 range: 0.97; then the graph's best RERANK candidates are re-scored exactly from a float16 copy in SQLite (on
# disk, not in memory): 0.99 (benchmarks/results/ann-usearch-1152d.md).
RERANK = 40
FILTERS = ("modality", "body_part", "study_date", "label", "study_uid", "series_uid")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,            -- SOP Instance UID, or sha256:HEX of an image file
    path TEXT, study_uid TEXT, series_uid TEXT, sop_uid TEXT,
    modality TEXT, body_part TEXT, study_date TEXT,
    labels TEXT NOT NULL DEFAULT '[]',   -- JSON list
    patient_hash TEXT,                   -- HMAC-SHA256(site salt, Patient ID), hex
    added REAL NOT NULL,
    vector16 BLOB                        -- i8 indexes: the vector in float16, for the exact rerank
);
CREATE INDEX IF NOT EXISTS items_study ON items(study_uid);
CREATE INDEX IF NOT EXISTS items_patient ON items(patient_hash);
CREATE INDEX IF NOT EXISTS items_sop ON items(sop_uid);
CREATE TABLE IF NOT EXISTS pending (id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""


@dataclass(frozen=True)
class Item:
    """One image's metadata, as stored."""

    key: str
    path: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    modality: str | None = None
    body_part: str | None = None
    study_date: str | None = None
    labels: tuple[str, ...] = ()
    patient_hash: str | None = None


@dataclass(frozen=True)
class Hit:
    """One search result: the item and its cosine similarity to the query."""

    id: int
    score: float
    item: Item

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self.item).items() if v not in (None, ())}
        d.pop("patient_hash", None)  # a search answer never carries it
        d["labels"] = list(self.item.labels)
        return {"id": self.id, "score": round(self.score, 6), **d}


@dataclass(frozen=True)
class IndexInfo:
    path: str
    count: int
    pending: int
    dim: int
    dtype: str
    bundle: dict
    modalities: dict[str, int]
    bytes_on_disk: int
    created: str
    extra: dict = field(default_factory=dict)


def patient_hash(salt: bytes, patient_id: str) -> str:
    """The only trace of a Patient ID an index keeps: HMAC-SHA256 under the site's salt."""
    return hmac.new(salt, patient_id.strip().encode("utf-8"), hashlib.sha256).hexdigest()


def salt_fingerprint(salt: bytes) -> str:
    return hashlib.sha256(b"medc index salt\0" + salt).hexdigest()[:16]


def read_salt(path: str | Path | None) -> bytes | None:
    """The site's salt from `path` (None: MEDC_INDEX_SALT_FILE; neither: None)."""
    path = path or os.environ.get("MEDC_INDEX_SALT_FILE")
    if not path:
        return None
    try:
        salt = Path(path).read_bytes().strip()
    except OSError as e:
        raise MedcError(f"cannot read the salt file {path} ({type(e).__name__}).") from None
    if len(salt) < 16:
        raise MedcError(f"the salt in {path} is shorter than 16 bytes; use a long random one "
                        "(`medc index salt FILE` writes one).")
    return salt


def _usearch():
    try:
        from usearch.index import Index
    except ImportError:
        raise MedcError("the embedding index needs usearch: pip install 'medc[retrieval]'.") from None
    return Index


class VectorIndex:
    """Open with `VectorIndex.create(...)` or `VectorIndex.open(path)`; use as a context manager (close saves)."""

    def __init__(self, path: Path, db: sqlite3.Connection, readonly: bool = False):
        self.path, self.db, self.readonly = Path(path), db, readonly
        # One writer at a time (two writers of the graph file would lose vectors); readers take no lock and follow
        # the writer's commits (`refresh`).
        self._lock = None if readonly else _lock(self.path)
        self._side: dict[int, np.ndarray] = {}  # a reader's committed vectors not yet in the graph file
        self._seen = (None, None)  # (SQLite data_version, graph file identity) the reader last synced to
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if int(meta.get("format", 0)) != FORMAT:
            raise MedcError(f"{path} is an index of format {meta.get('format')}; this medc reads format {FORMAT}.")
        self.dim, self.dtype = int(meta["dim"]), meta["dtype"]
        self.bundle = json.loads(meta["bundle"])
        self.created = meta["created"]
        self.salt_id = meta.get("salt_id")
        self._graph = None
        self._dirty = False
        self._resync()

    # -- opening ------------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, dim: int, bundle: dict, dtype: str = "f16") -> "VectorIndex":
        """A new, empty index at `path` for vectors of `dim` made by `bundle` ({"name", "sha256", "preprocessing"})."""
        path = Path(path)
        if dtype not in DTYPES:
            raise MedcError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r}).")
        if (path / DB_NAME).exists():
            raise MedcError(f"{path} already holds an index; add to it with `medc index add {path} PATH…`, or "
                            "choose another folder.")
        path.mkdir(parents=True, exist_ok=True)
        db = cls._connect(path)
        db.executescript(_SCHEMA)  # (executescript commits by itself)
        with _transaction(db):
            rows = {"format": FORMAT, "dim": dim, "dtype": dtype, "bundle": json.dumps(bundle, sort_keys=True),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in rows.items()])
        return cls(path, db)

    @classmethod
    def open(cls, path: str | Path, readonly: bool = False) -> "VectorIndex":
        """`readonly`: search only, beside the one process that writes (a listener, `medc index add`)."""
        path = Path(path)
        if not (path / DB_NAME).is_file():
            raise MedcError(f"{path} is not an embedding index (no {DB_NAME}); create one with "
                            f"`medc index create {path} --bundle BUNDLE`.")
        return cls(path, cls._connect(path), readonly)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path / DB_NAME, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before `add` returns
        db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left in free pages
        return db

    def __enter__(self) -> "VectorIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.db is not None:
            self.checkpoint()
            self.db.close()
            self.db = None
            if self._lock is not None:
                self._lock.close()  # releases the lock

    # -- the graph, resynced against SQLite ---------------------------------------------------------------------
    def _new_graph(self):
        return _usearch()(ndim=self.dim, metric="cos", dtype=self.dtype, connectivity=CONNECTIVITY,
                          expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)

    def _file_id(self):
        try:
            st = (self.path / VECTORS_NAME).stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def refresh(self) -> None:
        """A reader: follow what the writer committed since the last call. The graph file is mapped again when the
        writer replaced it; committed vectors it does not hold yet are searched exactly beside it; rows deleted
        since are never answered (every hit is looked up in SQLite)."""
        if not self.readonly:
            return  # the only writer: nothing changes under it
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        file_id = self._file_id()
        if (version, file_id) == self._seen:
            return
        if file_id != self._seen[1]:
            graph = self._new_graph()
            if file_id is not None:
                graph.view(str(self.path / VECTORS_NAME))  # memory-mapped: shared with the writer's page cache
            self._graph = graph
        in_graph = self._graph.contains if len(self._graph) else (lambda key: False)
        self._side = {row: np.frombuffer(blob, np.float32) for row, blob in
                      self.db.execute("SELECT id, vector FROM pending") if not in_graph(row)}
        self._seen = (version, file_id)

    def _resync(self) -> None:
        """Make the graph hold exactly SQLite's items (see the module's docstring). A reader only maps it."""
        if self.readonly:
            self._graph = self._new_graph()
            self.refresh()
            return
        graph = self._new_graph()
        file = self.path / VECTORS_NAME
        if file.is_file():
            try:
                graph.load(str(file))
            except Exception as e:  # noqa: BLE001 - a damaged file is rebuilt from what SQLite can give
                raise MedcError(f"{file} is unreadable ({type(e).__name__}); restore it from a backup, or rebuild "
                                "the index by adding the archive to a new one.") from None
        self._graph = graph
        ids = {r[0] for r in self.db.execute("SELECT id FROM items")}
        keys = set(int(k) for k in np.asarray(graph.keys)) if len(graph) else set()
        orphans = keys - ids
        if orphans:
            graph.remove(np.fromiter(orphans, np.uint64, len(orphans)))
            self._dirty = True
        missing = []
        for row_id, blob in self.db.execute("SELECT id, vector FROM pending"):
            if row_id in ids and row_id not in keys:
                missing.append((row_id, np.frombuffer(blob, np.float32)))
        if missing:
            graph.add(np.array([m[0] for m in missing], np.uint64), self._stored(np.stack([m[1] for m in missing])))
            self._dirty = True
        lost = ids - keys - {m[0] for m in missing} - {r[0] for r in self.db.execute("SELECT id FROM pending")}
        if lost:
            # Rows whose vectors are nowhere (the graph file was replaced by an older one): drop them, so a new
            # `add` of their sources embeds them again instead of skipping them as known.
            self._delete_rows(sorted(lost))
        if self._dirty or self.db.execute("SELECT 1 FROM pending LIMIT 1").fetchone():
            self.checkpoint()

    def checkpoint(self) -> None:
        """Write the graph (atomically) and drop the pending vectors it now holds."""
        if self.db is None or self.readonly:
            return
        if not self._dirty and not self.db.execute("SELECT 1 FROM pending LIMIT 1").fetchone():
            return
        file = self.path / VECTORS_NAME
        tmp = file.with_name(f".{file.name}.tmp")
        self._graph.save(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
        with _transaction(self.db):
            self.db.execute("DELETE FROM pending")
        self._dirty = False

    def _writable(self) -> None:
        if self.readonly:
            raise MedcError(f"index {self.path} is open for searching only: another process writes it (a listener or "
                            "`medc index add`); add and remove through that one, or stop it first.")

    # -- bundles and salts ----------------------------------------------------------------------------------------
    def check_bundle(self, bundle: dict) -> None:
        """Refuse vectors (queries, additions) made by another bundle than the index's."""
        mine = self.bundle
        if bundle.get("sha256") != mine.get("sha256"):
            raise MedcError(f"index {self.path} holds embeddings of bundle {mine.get('name')!r} (manifest sha256 "
                            f"{mine.get('sha256', '?')[:16]}…), not of {bundle.get('name')!r} (sha256 "
                            f"{bundle.get('sha256', '?')[:16]}…): embeddings of two builds are not comparable. Use "
                            "the bundle that made the index, or create a new index for this one.")

    def check_salt(self, salt: bytes) -> None:
        """The first salt used is recorded (by fingerprint); another would hash the same patient differently."""
        fp = salt_fingerprint(salt)
        if self.salt_id is None and not self.readonly:
            with _transaction(self.db):
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('salt_id', ?)", (fp,))
            self.salt_id = fp
        elif self.salt_id is not None and fp != self.salt_id:
            raise MedcError(f"this is not the salt index {self.path} was made with: its patients' hashes would not "
                            "match. Give the site's salt file (--salt-file or MEDC_INDEX_SALT_FILE).")

    # -- adding -----------------------------------------------------------------------------------------------------
    def known(self, keys: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = f"SELECT key FROM items WHERE key IN ({','.join('?' * len(chunk))})"
            out |= {r[0] for r in self.db.execute(q, chunk)}
        return out

    def add(self, items: list[Item], vectors: np.ndarray) -> int:
        """Add items (those whose key is not in the index yet) with their L2-normalised vectors; durable when it
        returns. Returns how many were added."""
        self._writable()
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(items), self.dim):
            raise MedcError(f"expected {len(items)} vectors of {self.dim} values, got shape {vectors.shape}.")
        known = self.known([it.key for it in items])
        new, ids, rows = set(), [], []
        now = time.time()
        with _transaction(self.db):
            for it, vec in zip(items, vectors):
                if it.key in known or it.key in new:
                    continue
                new.add(it.key)
                cur = self.db.execute(
                    "INSERT INTO items (key, path, study_uid, series_uid, sop_uid, modality, body_part, study_date, "
                    "labels, patient_hash, added, vector16) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (it.key, it.path, it.study_uid, it.series_uid, it.sop_uid, it.modality, it.body_part,
                     it.study_date, json.dumps(list(it.labels)), it.patient_hash, now,
                     vec.astype(np.float16).tobytes() if self.dtype == "i8" else None))
                ids.append(cur.lastrowid)
                rows.append(vec)
                self.db.execute("INSERT INTO pending VALUES (?, ?)", (cur.lastrowid, vec.tobytes()))
        if ids:
            self._graph.add(np.array(ids, np.uint64), self._stored(np.stack(rows)))
            self._dirty = True
        return len(ids)

    def _stored(self, vectors: np.ndarray) -> np.ndarray:
        """What the graph is given: i8 indexes scale each vector by 1 / max|x| (see RERANK)."""
        if self.dtype != "i8":
            return vectors
        return vectors / np.maximum(np.abs(vectors).max(axis=-1, keepdims=True), 1e-12)

    # -- searching ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM items").fetchone()[0]

    def _items(self, ids: list[int]) -> dict[int, Item]:
        out = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            q = ("SELECT id, key, path, study_uid, series_uid, sop_uid, modality, body_part, study_date, labels, "
                 f"patient_hash FROM items WHERE id IN ({','.join('?' * len(chunk))})")
            for r in self.db.execute(q, chunk):
                out[r[0]] = Item(*r[1:9], tuple(json.loads(r[9])), r[10])
        return out

    def _where(self, filters: dict[str, str]) -> tuple[str, list]:
        clauses, args = [], []
        for name, value in filters.items():
            if name not in FILTERS:
                raise MedcError(f"cannot filter on {name!r}; filters: {', '.join(FILTERS)} (e.g. modality=CT).")
            if name == "label":
                clauses.append("EXISTS (SELECT 1 FROM json_each(items.labels) WHERE json_each.value = ?)")
            else:
                clauses.append(f"{name} = ?")
            args.append(value)
        return " AND ".join(clauses), args

    def search(self, query: np.ndarray, k: int = 10, filters: dict[str, str] | None = None,
               exclude: int | None = None) -> list[Hit]:
        """The k items nearest `query` (cosine), best first, among those matching every filter."""
        if not 1 <= k <= 1000:
            raise MedcError(f"k must be in 1..1000 (got {k}).")
        query = np.asarray(query, np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise MedcError(f"the query has {query.shape[0]} values; this index holds {self.dim}-d vectors.")
        self.refresh()
        total = len(self)
        if total == 0:
            return []
        filters = filters or {}
        want = k + (exclude is not None)
        where, args = self._where(filters) if filters else ("1", [])
        if filters:
            count = self.db.execute(f"SELECT count(*) FROM items WHERE {where}", args).fetchone()[0]
            if count <= EXACT_BELOW:  # few enough: exact cosine over exactly those
                ids = [r[0] for r in self.db.execute(f"SELECT id FROM items WHERE {where}", args)]
                return self._hits(self._exact(query, ids, want), k, exclude)
        side = self._exact(query, list(self._side), want) if self._side else []
        size = len(self._graph)
        ask = min(size, max(want * 4 if filters else want, RERANK if self.dtype == "i8" else 0))
        while True:
            pairs = list(side)
            if ask:
                found = self._graph.search(self._stored(query[None])[0], ask)
                graph = [int(key) for key in found.keys]
                if self.dtype == "i8":  # the candidates re-scored exactly (see RERANK)
                    pairs += self._exact(query, graph, len(graph))
                else:
                    pairs += [(key, 1.0 - float(d)) for key, d in zip(graph, found.distances)]
            pairs.sort(key=lambda p: -p[1])
            # Only what SQLite holds (and the filters allow): a reader's mapped graph may still hold rows deleted
            # since, or not yet hold new ones (those are in `side`).
            cand, ok = [p[0] for p in pairs], set()
            for i in range(0, len(cand), 500):
                chunk = cand[i:i + 500]
                q = f"SELECT id FROM items WHERE id IN ({','.join('?' * len(chunk))}) AND {where}"
                ok |= {r[0] for r in self.db.execute(q, [*chunk, *args])}
            allowed = [p for p in pairs if p[0] in ok]
            if len(allowed) >= want or ask >= size:
                return self._hits(allowed, k, exclude)
            ask = min(size, ask * 4)

    def _exact(self, query: np.ndarray, ids: list[int], k: int) -> list[tuple[int, float]]:
        if not ids:
            return []
        vecs = self._vectors(ids)
        norms = np.linalg.norm(vecs, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
        scores = vecs @ query / np.maximum(norms, 1e-12)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(ids[i], float(scores[i])) for i in order]

    def _hits(self, pairs: list[tuple[int, float]], k: int, exclude: int | None) -> list[Hit]:
        pairs = [p for p in pairs if p[0] != exclude][:k]
        items = self._items([p[0] for p in pairs])
        return [Hit(i, s, items[i]) for i, s in pairs if i in items]

    def _vectors(self, ids) -> np.ndarray:
        """The stored vectors of `ids` as float32 [n, dim] (i8 ones dequantised)."""
        ids = [int(i) for i in ids]
        out = np.empty((len(ids), self.dim), np.float32)
        in_graph = [j for j, i in enumerate(ids) if i not in self._side]
        for j, i in enumerate(ids):
            if i in self._side:
                out[j] = self._side[i]
        if in_graph and self.dtype == "i8":  # the float16 copy, exact where the graph's int8 is not
            want = [ids[j] for j in in_graph]
            found = {}
            for i in range(0, len(want), 500):
                chunk = want[i:i + 500]
                q = f"SELECT id, vector16 FROM items WHERE id IN ({','.join('?' * len(chunk))})"
                found.update({row: np.frombuffer(blob, np.float16) for row, blob in self.db.execute(q, chunk)
                              if blob is not None})
            missing = [j for j in in_graph if ids[j] not in found]
            for j in in_graph:
                if ids[j] in found:
                    out[j] = found[ids[j]]
            in_graph = missing
        if in_graph:
            got = self._graph.get(np.array([ids[j] for j in in_graph], np.uint64), dtype=np.float32)
            got = np.stack(got) if isinstance(got, tuple) else np.asarray(got, np.float32).reshape(-1, self.dim)
            out[in_graph] = got
        return out

    def vector(self, row_id: int) -> np.ndarray:
        self.refresh()
        return self._vectors([row_id])[0]

    def find_sop(self, sop_uid: str) -> int:
        row = self.db.execute("SELECT id FROM items WHERE sop_uid = ? OR key = ?", (sop_uid, sop_uid)).fetchone()
        if row is None:
            raise MedcError(f"no instance with SOP Instance UID {sop_uid[:80]!r} in index {self.path}.")
        return row[0]

    # -- removing -----------------------------------------------------------------------------------------------
    def remove(self, study_uids: list[str] = (), patient: str | None = None) -> int:
        """Delete every item of these studies, or of the patient whose salted hash is `patient`; for real (see the
        module's docstring). Returns how many were removed."""
        self._writable()
        ids: list[int] = []
        for uid in study_uids:
            ids += [r[0] for r in self.db.execute("SELECT id FROM items WHERE study_uid = ?", (uid,))]
        if patient is not None:
            ids += [r[0] for r in self.db.execute("SELECT id FROM items WHERE patient_hash = ?", (patient,))]
        ids = sorted(set(ids))
        self._delete_rows(ids)
        return len(ids)

    def _delete_rows(self, ids: list[int]) -> None:
        if not ids:
            return
        self.checkpoint()  # every pending vector into the graph first: the rebuild below reads them from it
        with _transaction(self.db):
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                self.db.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk)
                self.db.execute(f"DELETE FROM pending WHERE id IN ({marks})", chunk)
        # The graph rebuilt from what remains: usearch's remove leaves tombstones (and the vectors' bytes) in it.
        keep = [r[0] for r in self.db.execute("SELECT id FROM items ORDER BY id")]
        graph = self._new_graph()
        for i in range(0, len(keep), 10_000):
            chunk = np.array(keep[i:i + 10_000], np.uint64)
            graph.add(chunk, self._stored(self._vectors(chunk)))
        self._graph, self._dirty = graph, True
        self.checkpoint()
        self.db.execute("VACUUM")  # rewrites the file: no deleted row left in a free page
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and none in the write-ahead log

    # -- reporting ----------------------------------------------------------------------------------------------
    def info(self) -> IndexInfo:
        modalities = dict(self.db.execute("SELECT coalesce(modality, '(image file)'), count(*) FROM items "
                                          "GROUP BY 1 ORDER BY 2 DESC"))
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        pending = self.db.execute("SELECT count(*) FROM pending").fetchone()[0]
        return IndexInfo(str(self.path), len(self), pending, self.dim, self.dtype, self.bundle, modalities, size,
                         self.created, {"connectivity": CONNECTIVITY, "expansion_search": EXPANSION_SEARCH})


def _lock(path: Path):
    """An exclusive lock on the index folder, held while it is open (the file closes, and the lock goes, with the
    process, however it ends)."""
    import fcntl

    f = open(path / ".lock", "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise MedcError(f"index {path} is open in another process (a server, a listener or another `medc index` "
                        "command); stop it, or use that server's /v1/search and /v1/index.") from None
    return f


@contextmanager
def _transaction(db: sqlite3.Connection):
    """One transaction (the connection runs in autocommit mode, where `with db:` would begin none)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def open_index(path: str | Path) -> VectorIndex:
    return VectorIndex.open(path)


def sqlite_version_ok() -> bool:
    """json_each (label filters) needs SQLite's JSON1, built in since 3.38."""
    with closing(sqlite3.connect(":memory:")) as db:
        try:
            db.execute("SELECT value FROM json_each('[1]')").fetchall()
            return True
        except sqlite3.OperationalError:
            return False

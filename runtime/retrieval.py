"""Similar-case retrieval over a MedSigLIP bundle: images and DICOM files into an index (runtime/vectorindex.py),
queries by image, text or an indexed instance. What the CLI (`medc index`, `medc search`), the server
(`/v1/search`, `/v1/index`), the listener (`--index`) and `medc eval --retrieval` share.

An item's key makes adding resumable and idempotent: a DICOM instance is its SOP Instance UID, any other image the
sha256 of its file's bytes. Keys already in the index are skipped before anything is decoded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.runtime.dicom import read_header
from medc.runtime.vectorindex import Item, VectorIndex, patient_hash

log = logging.getLogger("medc.retrieval")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHECKPOINT_EVERY = 64  # batches between writes of the graph (what a kill loses is only re-added from SQLite)


def bundle_record(pipeline) -> dict:
    """What an index records of the bundle that made its vectors: name, manifest digest, image preprocessing and
    where it was (a hint for commands that are not given --bundle)."""
    from medc.manifest import read_json_file
    from medc.signing import digest

    bundle = pipeline.bundle
    if bundle.manifest.model.get("family") != "siglip":
        raise MedcError(f"bundle {bundle.path} is a {bundle.manifest.model.get('family')} model; an embedding index "
                        "needs a MedSigLIP bundle (image and text encoders).")
    return {"name": bundle.manifest.model["name"], "sha256": digest(read_json_file(Path(bundle.path))),
            "preprocessing": bundle.manifest.preprocessing.get("image", {}), "path": str(Path(bundle.path).resolve())}


def embedding_dim(pipeline) -> int:
    return int(pipeline.bundle.manifest.components["image_encoder"].outputs[0].shape[-1])


# -- sources --------------------------------------------------------------------------------------------------------
def collect(paths: list[str | Path]) -> list[Path]:
    """Image and DICOM files among `paths`, folders walked (sorted, hidden files skipped)."""
    from medc.runtime.preprocess import is_dicom_file

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in
                          f.relative_to(p).parts) and (f.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(f)))
        elif p.is_file():
            out.append(p)
        else:
            raise MedcError(f"{p} does not exist; give image files, DICOM files or folders of them.")
    return out


def _text(ds, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


class SaltRequired(MedcError):
    """A DICOM instance names a patient and no site salt was given: its Patient ID could not be hashed, so the
    patient's data could not be found for deletion later. Callers name their own option for the salt."""


def describe(path: Path, salt: bytes | None, labels: tuple[str, ...] = ()) -> Item:
    """An item's key and metadata, from the DICOM header (no pixels read) or the file's sha256. A DICOM file that
    names a patient needs the site's salt: without it the patient's data could not be found for deletion."""
    from medc.runtime.preprocess import is_dicom_file

    if is_dicom_file(path):
        return dicom_item(read_header(path, path.name), salt, labels, path=str(path))
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise MedcError(f"{path.name} is neither a PNG/JPEG image nor a DICOM file.")
    return image_item(path.read_bytes(), labels, path=str(path))


def describe_bytes(data: bytes, is_dicom: bool, name: str, salt: bytes | None,
                   labels: tuple[str, ...] = ()) -> Item:
    """`describe` for bytes that are no file (an image sent to medc serve's POST /v1/index): the same key and
    metadata as the file would get, without a path. `name` stands for the source in messages."""
    if is_dicom:
        return dicom_item(read_header(data, name), salt, labels, name=name)
    return image_item(data, labels)


def image_item(data: bytes, labels: tuple[str, ...] = (), path: str | None = None) -> Item:
    """A PNG or JPEG is keyed by the sha256 of its bytes: the same image added twice, from anywhere, is one item."""
    return Item(key=f"sha256:{hashlib.sha256(data).hexdigest()}", path=path, labels=labels)



def dicom_item(ds, salt: bytes | None, labels: tuple[str, ...] = (), path: str | None = None,
               name: str | None = None) -> Item:
    """A DICOM instance's item from its header (a pydicom Dataset, pixels not needed), keyed by its SOP Instance
    UID. Raises SaltRequired when it names a patient and `salt` is None."""
    where = name or (Path(path).name if path else "the instance")
    sop = _text(ds, "SOPInstanceUID")
    if sop is None:
        raise MedcError(f"{where} has no SOP Instance UID; medc indexes DICOM instances by it.")
    pid = _text(ds, "PatientID")
    if pid is not None and salt is None:
        raise SaltRequired("DICOM files name a patient: give the site's salt (--salt-file FILE or "
                           "MEDC_INDEX_SALT_FILE; `medc index salt FILE` makes one), kept outside the index, so a "
                           "patient's data can be found and deleted later.")
    return Item(key=sop, path=path, study_uid=_text(ds, "StudyInstanceUID"),
                series_uid=_text(ds, "SeriesInstanceUID"), sop_uid=sop, modality=_text(ds, "Modality"),
                body_part=_text(ds, "BodyPartExamined"), study_date=_text(ds, "StudyDate"), labels=labels,
                patient_hash=patient_hash(salt, pid) if pid is not None else None)


def pixels(pipeline, path: Path) -> np.ndarray:
    """One file's model-ready pixels [3, H, W]: a DICOM instance's middle frame by the built-in recipes."""
    from medc.runtime.preprocess import is_dicom_file, load_image

    if is_dicom_file(path):
        from medc.runtime.dicom import read_dicom

        return pipeline.preprocess.one(read_dicom(path)[0].pixels)
    return pipeline.preprocess.one(load_image(path, pipeline.preprocess))


@dataclass
class AddReport:
    added: int = 0
    known: int = 0  # already in the index: skipped
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)


def add_paths(index: VectorIndex, pipeline, paths: list[str | Path], salt: bytes | None = None,
              labels_from_folders: bool = False, batch: int = 16, progress=None) -> AddReport:
    """Embed and add every image and DICOM file under `paths` not yet in the index. Resumable: rerun after an
    interruption and it continues where it stopped, adding nothing twice. Files that cannot be read are reported,
    not fatal."""
    index.check_bundle(bundle_record(pipeline))
    if salt is not None:
        index.check_salt(salt)
    report = AddReport()
    files = collect(paths)
    roots = [Path(p) for p in paths if Path(p).is_dir()]

    def labels_of(f: Path) -> tuple[str, ...]:
        if not labels_from_folders:
            return ()
        root = next((r for r in roots if r in f.parents), None)
        return (f.relative_to(root).parts[0],) if root is not None and len(f.relative_to(root).parts) > 1 else ()

    todo: list[Item] = []
    for f in files:
        try:
            todo.append(describe(f, salt, labels_of(f)))
        except MedcError as e:
            if "salt" in str(e):
                raise
            report.failed.append((f.name, str(e)))
    known = index.known([it.key for it in todo])
    report.known = sum(1 for it in todo if it.key in known)
    todo = [it for it in todo if it.key not in known]
    for b, start in enumerate(range(0, len(todo), batch)):
        chunk, px = [], []
        for it in todo[start:start + batch]:
            try:
                px.append(pixels(pipeline, Path(it.path)))
                chunk.append(it)
            except MedcError as e:
                report.failed.append((Path(it.path).name, str(e)))
        if chunk:
            report.added += index.add(chunk, pipeline.embed_pixel_values(np.stack(px)))
        if (b + 1) % CHECKPOINT_EVERY == 0:
            index.checkpoint()
        if progress:
            progress(min(start + batch, len(todo)), len(todo))
    index.checkpoint()
    return report


# -- queries --------------------------------------------------------------------------------------------------------
def query_vector(index: VectorIndex, pipeline=None, image=None, text: str | None = None,
                 sop_uid: str | None = None) -> tuple[np.ndarray, int | None]:
    """(query vector, id of an indexed item to leave out of the results) for exactly one of an image (a path, PIL
    image or pixel array), a text, or an indexed instance's SOP Instance UID."""
    given = [x is not None for x in (image, text, sop_uid)]
    if sum(given) != 1:
        raise MedcError("give exactly one query: an image, a text, or the SOP Instance UID of an indexed instance.")
    if sop_uid is not None:
        row = index.find_sop(sop_uid)
        return index.vector(row), row
    if pipeline is None:
        raise MedcError("a query by image or text needs the index's bundle to embed it.")
    index.check_bundle(bundle_record(pipeline))
    if text is not None:
        if not text.strip():
            raise MedcError("the text query is empty.")
        return pipeline.embed_texts([text])[0], None
    if isinstance(image, (str, Path)):
        return pipeline.embed_pixel_values(pixels(pipeline, Path(image))[None])[0], None
    return pipeline.embed_pixel_values(pipeline.preprocess.one(image)[None])[0], None


def parse_filters(pairs: list[str]) -> dict[str, str]:
    """--where NAME=VALUE (repeatable) -> {NAME: VALUE}."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise MedcError(f"--where takes NAME=VALUE (e.g. modality=CT), not {pair[:80]!r}.")
        out[name.strip()] = value.strip()
    return out


# -- evaluation -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalEval:
    """Leave-one-out retrieval over a labelled set: each item queries the others."""

    items: int
    labels: dict[str, int]  # items per label
    precision: dict[int, float]  # P@k: share of the k nearest that carry the query's label
    majority: dict[int, float]  # accuracy of the majority label of the k nearest (ties: the nearer label)
    recall: dict[int, float]  # the ANN index's top k against exact search
    dtype: str
    failed: list[tuple[str, str]] = field(default_factory=list)


def _majority(labels: list[str]) -> str:
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    top = max(counts.values())
    return next(lab for lab in labels if counts[lab] == top)  # the nearest among the tied labels


def evaluate(pipeline, labelled: Path, ks: tuple[int, ...] = (1, 5, 10), dtype: str = "f16",
             batch: int = 16) -> RetrievalEval:
    """P@k and k-NN majority-vote accuracy (the radiology retrieval literature's measures) on `labelled`, one
    sub-folder per label (images or DICOM), through the same index the site would use, and the index's recall@k
    against exact cosine search on the same vectors."""
    import tempfile

    labelled = Path(labelled)
    folders = sorted(p for p in labelled.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if labelled.is_dir() else []
    files = [(f, d.name) for d in folders for f in collect([d])]
    counts = {d.name: sum(1 for _, lab in files if lab == d.name) for d in folders}
    counts = {k: v for k, v in counts.items() if v}
    if len(counts) < 2 or min(counts.values()) < 2:
        raise MedcError(f"{labelled} needs one sub-folder per label, at least two labels with two images each "
                        f"(found {counts or 'none'}).")
    kmax = max(ks)
    if len(files) <= kmax:
        raise MedcError(f"k = {kmax} needs more than {kmax} images; {labelled} has {len(files)}.")
    vecs, labels, failed = [], [], []
    for start in range(0, len(files), batch):
        px, labs = [], []
        for f, lab in files[start:start + batch]:
            try:
                px.append(pixels(pipeline, f))
                labs.append(lab)
            except MedcError as e:
                failed.append((f.name, str(e)))
        if px:
            vecs.append(pipeline.embed_pixel_values(np.stack(px)))
            labels += labs
    v = np.concatenate(vecs).astype(np.float32)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    n = len(v)
    with tempfile.TemporaryDirectory() as tmp:
        idx = VectorIndex.create(Path(tmp) / "eval", v.shape[1], bundle_record(pipeline), dtype)
        try:
            idx.add([Item(key=str(i)) for i in range(n)], v)
            row_ids = [r[0] for r in idx.db.execute("SELECT id FROM items ORDER BY id")]
            position = {row: i for i, row in enumerate(row_ids)}  # row id -> position in `v`
            ann = [[position[h.id] for h in idx.search(v[i], kmax, exclude=row_ids[i])] for i in range(n)]
        finally:
            idx.close()
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    exact = np.argsort(-sims, axis=1, kind="stable")[:, :kmax]
    precision, majority, recall = {}, {}, {}
    for k in ks:
        precision[k] = float(np.mean([sum(labels[j] == labels[i] for j in ann[i][:k]) / k for i in range(n)]))
        majority[k] = float(np.mean([_majority([labels[j] for j in ann[i][:k]]) == labels[i] for i in range(n)]))
        recall[k] = float(np.mean([len(set(ann[i][:k]) & set(exact[i, :k].tolist())) / k for i in range(n)]))
    return RetrievalEval(n, counts, precision, majority, recall, dtype, failed)


# -- long-running writers (medc serve --index, medc listen --index) ---------------------------------------------------
@dataclass
class Checkpointer:
    """When a long-running writer writes the graph file. Each `add` is durable when it returns (its vectors are in
    SQLite's pending table), so a checkpoint only bounds how much a restart re-adds from there and how large that
    table grows; it rewrites the whole graph, so it is not worth doing per add on a large index."""

    every_items: int = 256
    every_s: float = 30.0
    unsaved: int = 0
    saved_at: float = field(default_factory=time.monotonic)

    def added(self, index: VectorIndex, n: int) -> None:
        """Call after an add of `n` new items, under the writer's lock."""
        self.unsaved += n
        if self.unsaved and (self.unsaved >= self.every_items or time.monotonic() - self.saved_at >= self.every_s):
            self.save(index)

    def save(self, index: VectorIndex) -> None:
        index.checkpoint()
        self.unsaved, self.saved_at = 0, time.monotonic()

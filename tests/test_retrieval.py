"""Similar-case retrieval on the tiny MedSigLIP bundle: real images (skimage), real DICOM (pydicom's test files) and
generated ones. Search by image finds the image itself first, text search ranks by cosine, filters work, another
bundle is refused, a kill -9 during `medc index add` loses nothing and adds nothing twice, and removal deletes rows
and vectors for real (their bytes are gone from the database, its WAL and the graph file)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("usearch", reason="the embedding index needs the retrieval extra: pip install 'medc[retrieval]'")

from medc.errors import MedcError  # noqa: E402
from medc.runtime import load  # noqa: E402
from medc.runtime.retrieval import add_paths, bundle_record, embedding_dim, query_vector  # noqa: E402
from medc.runtime.vectorindex import DB_NAME, VectorIndex, patient_hash  # noqa: E402

DICOM = ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "US1_UNCR.dcm")
SALT = b"a site salt of at least sixteen bytes"


def generated(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Distinct PNGs: smooth random fields, 96 px, some folders of them (labels)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sub = folder / ("effusion" if i % 2 else "normal")
        sub.mkdir(parents=True, exist_ok=True)
        base = rng.random((6, 6, 3))
        img = np.kron(base, np.ones((16, 16, 1))) * 255
        path = sub / f"g{i:03d}.png"
        Image.fromarray(img.astype(np.uint8)).save(path)
        out.append(path)
    return out


@pytest.fixture
def archive(tmp_path, real_images) -> Path:
    from pydicom.data import get_testdata_file

    root = tmp_path / "archive"
    generated(root / "png", 12)
    (root / "real").mkdir()
    for p in real_images:
        (root / "real" / p.name).write_bytes(p.read_bytes())
    (root / "dicom").mkdir()
    for name in DICOM:
        (root / "dicom" / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    return root


@pytest.fixture(params=["f16", "i8"])
def index(request, tmp_path, bundle_fp32, archive):
    with load(bundle_fp32) as pipe:
        idx = VectorIndex.create(tmp_path / "index", embedding_dim(pipe), bundle_record(pipe), request.param)
        report = add_paths(idx, pipe, [archive / "png", archive / "real", archive / "dicom"], SALT,
                           labels_from_folders=True)  # png/normal/..., png/effusion/...: labelled by sub-folder
        assert report.added == 12 + 3 + 4 and not report.failed
        yield idx, pipe
        idx.close()


def test_search_by_image_text_and_instance(index, archive, real_images):
    idx, pipe = index
    # every image finds itself first
    for path in [*real_images, *sorted((archive / "png").rglob("*.png"))[:4], archive / "dicom" / "CT_small.dcm"]:
        vec, _ = query_vector(idx, pipe, image=path)
        best = idx.search(vec, 3)[0]
        assert Path(best.item.path).name == path.name and best.score > 0.999
    # text: the ranking is the cosine ranking over every indexed vector
    vec, _ = query_vector(idx, pipe, text="a chest radiograph with a tension pneumothorax")
    hits = idx.search(vec, 19)
    everything = idx._vectors([h.id for h in hits])
    cosine = everything @ vec / np.linalg.norm(everything, axis=1) / np.linalg.norm(vec)
    assert [round(h.score, 3) for h in hits] == [round(c, 3) for c in sorted(cosine, reverse=True)]
    assert len(hits) == 19 == len(idx)
    # an indexed instance: itself left out, its nearest neighbours by cosine
    vec, exclude = query_vector(idx, sop_uid="1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322")
    hits = idx.search(vec, 5, exclude=exclude)
    assert exclude not in {h.id for h in hits} and len(hits) == 5


def test_filters_and_metadata(index):
    idx, pipe = index
    vec, _ = query_vector(idx, pipe, text="a CT slice")
    cts = idx.search(vec, 10, {"modality": "CT"})
    assert [h.item.modality for h in cts] == ["CT"]
    ct = cts[0].item
    assert ct.study_date == "20040119" and ct.study_uid and ct.series_uid
    assert ct.patient_hash == patient_hash(SALT, "1CT1")  # the only trace of the Patient ID
    chest = idx.search(vec, 10, {"body_part": "CHEST"})
    assert [h.item.modality for h in chest] == ["CR"]
    effusions = idx.search(vec, 20, {"label": "effusion"})
    assert len(effusions) == 6 and all(h.item.labels == ("effusion",) for h in effusions)
    assert idx.search(vec, 5, {"modality": "MG"}) == []
    with pytest.raises(MedcError, match="cannot filter on 'patient_hash'"):
        idx.search(vec, 5, {"patient_hash": "x"})
    raw = (idx.path / DB_NAME).read_bytes() + b"".join(p.read_bytes() for p in idx.path.glob("*-wal"))
    assert b"1CT1" not in raw and b"4MR1" not in raw  # no Patient ID anywhere in the index's files
    info = idx.info()
    assert info.count == 19 and info.modalities["(image file)"] == 15 and info.modalities["CT"] == 1


def test_adding_again_adds_nothing_and_needs_the_same_salt(index, archive):
    idx, pipe = index
    again = add_paths(idx, pipe, [archive], SALT)
    assert again.added == 0 and again.known == 19
    with pytest.raises(MedcError, match="not the salt index"):
        add_paths(idx, pipe, [archive], b"another salt of sixteen bytes or more")
    with pytest.raises(MedcError, match="DICOM files name a patient: give the site's salt"):
        fresh = VectorIndex.create(idx.path.parent / "nosalt", idx.dim, idx.bundle)
        add_paths(fresh, pipe, [archive / "dicom"], None)


def test_another_bundle_is_refused(index, bundle_int8, real_images):
    idx, _ = index
    with pytest.raises(MedcError, match="is open in another process"):
        VectorIndex.open(idx.path)  # one writer at a time
    with load(bundle_int8) as other:
        with pytest.raises(MedcError, match="embeddings of two builds are not comparable"):
            query_vector(idx, other, image=real_images[0])
        with pytest.raises(MedcError, match="embeddings of two builds are not comparable"):
            add_paths(idx, other, real_images)


def test_remove_study_and_patient_for_real(index, archive):
    idx, pipe = index
    ct = idx.search(query_vector(idx, pipe, text="x")[0], 20, {"modality": "CT"})[0]
    study, ct_vec = ct.item.study_uid, idx.vector(ct.id)
    assert idx.remove([study]) == 1
    mr = idx.search(query_vector(idx, pipe, text="x")[0], 20, {"modality": "MR"})[0]
    assert idx.remove(patient=patient_hash(SALT, "4MR1")) == 1
    assert len(idx) == 17 and len(idx._graph) == 17
    idx.close()
    reopened = VectorIndex.open(idx.path)
    try:
        assert len(reopened) == 17 and len(reopened._graph) == 17
        assert reopened.search(ct_vec, 1)[0].id != ct.id
        with pytest.raises(MedcError, match="no instance with SOP Instance UID"):
            reopened.find_sop(ct.item.sop_uid)
    finally:
        reopened.close()
    files = {p.name: p.read_bytes() for p in idx.path.iterdir() if p.is_file()}
    everything = b"".join(files.values())
    for uid in (study, ct.item.sop_uid, mr.item.sop_uid, mr.item.study_uid):
        assert uid.encode() not in everything, uid  # not in free pages, the WAL, or anywhere
    assert ct_vec.astype(np.float16).tobytes()[:64] not in everything  # nor its vector (graph, f16 copy)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "medc.cli", *map(str, args)], capture_output=True, text=True, **kw)


def test_kill_9_during_add_then_rerun_adds_every_item_once(tmp_path, bundle_fp32):
    files = generated(tmp_path / "many", 240, seed=3)
    index = tmp_path / "idx"
    assert _cli("index", "create", index, "--bundle", bundle_fp32).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "medc.cli", "index", "add", index, tmp_path / "many",
                             "--batch", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    seen = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(index / DB_NAME, timeout=5) as db:
                seen = db.execute("SELECT count(*) FROM items").fetchone()[0]
        except sqlite3.OperationalError:
            seen = 0
        if seen >= 40:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "index add finished before it could be killed; give it more files"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < seen < len(files)
    rerun = _cli("index", "add", index, tmp_path / "many", "--batch", "8")
    assert rerun.returncode == 0, rerun.stderr
    added = int(rerun.stdout.split("added ")[1].split(",")[0])
    known = int(rerun.stdout.split("already indexed ")[1].split(",")[0])
    assert added + known == len(files) and known >= seen
    with VectorIndex.open(index) as idx:
        keys = [r[0] for r in idx.db.execute("SELECT key FROM items")]
        assert len(keys) == len(set(keys)) == len(files)
        assert len(idx._graph) == len(files)
        assert idx.db.execute("SELECT count(*) FROM pending").fetchone()[0] == 0


def test_cli_search_json(index, archive, tmp_path):
    idx, _ = index
    idx.close()
    out = _cli("search", idx.path, "--image", archive / "dicom" / "MR_small.dcm", "-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    assert results[0]["modality"] == "MR" and results[0]["score"] > 0.999 and len(results) == 3
    assert "patient_hash" not in results[0] and {"id", "score", "sop_uid", "study_uid", "labels"} <= set(results[0])
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    text = _cli("search", idx.path, "--text", "fundus", "--where", "label=normal", "-k", "2", "--json")
    assert all(r["labels"] == ["normal"] for r in json.loads(text.stdout)["results"])
    bad = _cli("search", idx.path, "--text", "x", "--where", "modality")
    assert bad.returncode != 0 and "--where takes NAME=VALUE" in bad.stderr and "Traceback" not in bad.stderr
    info = _cli("index", "info", idx.path, "--json")
    assert json.loads(info.stdout)["count"] == 19
    salt = tmp_path / "salt"
    assert _cli("index", "salt", salt).returncode == 0 and oct(salt.stat().st_mode & 0o777) == "0o600"
    gone = _cli("index", "remove", idx.path, "--patient-id", "1CT1", env={**os.environ, "MEDC_INDEX_SALT_FILE": str(salt)})
    assert gone.returncode != 0 and "not the salt index" in gone.stderr


def test_eval_retrieval(tmp_path, bundle_fp32):
    """Two visually distinct classes: the tiny random model still separates them; every figure is in [0, 1] and
    the index's recall against exact search is (near) perfect at this size."""
    from PIL import Image

    rng = np.random.default_rng(7)
    for label, colour in (("bright", 220), ("dark", 30)):
        (tmp_path / "set" / label).mkdir(parents=True)
        for i in range(8):
            img = np.clip(colour + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "set" / label / f"{i}.png")
    out = _cli("eval", bundle_fp32, "--retrieval", tmp_path / "set", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["items"] == 16 and res["labels"] == {"bright": 8, "dark": 8}
    assert res["precision"]["1"] == 1.0 and res["majority"]["5"] == 1.0
    assert all(0 <= v <= 1 for part in ("precision", "majority", "recall") for v in res[part].values())
    assert res["recall"]["10"] >= 0.98
    one = _cli("eval", bundle_fp32, "--retrieval", tmp_path / "set" / "dark")
    assert one.returncode != 0 and "one sub-folder per label" in one.stderr


def test_a_reader_follows_the_writer(tmp_path, bundle_fp32, real_images):
    """One process writes (a listener, `medc index add`); others search beside it: what the writer commits is found
    before the graph file is rewritten, after it is, and what it removes is gone."""
    files = generated(tmp_path / "set", 10, seed=5)
    with load(bundle_fp32) as pipe:
        writer = VectorIndex.create(tmp_path / "idx", embedding_dim(pipe), bundle_record(pipe))
        add_paths(writer, pipe, files[:6])  # checkpointed: in the graph file
        reader = VectorIndex.open(tmp_path / "idx", readonly=True)
        try:
            assert len(reader._graph) == 6
            vec, _ = query_vector(reader, pipe, image=files[8])
            assert Path(reader.search(vec, 1)[0].item.path).name != files[8].name
            from medc.runtime.retrieval import describe, pixels

            items = [describe(f, None) for f in files[6:]]
            writer.add(items, pipe.embed_pixel_values(np.stack([pixels(pipe, f) for f in files[6:]])))  # no checkpoint
            best = reader.search(vec, 1)[0]
            assert Path(best.item.path).name == files[8].name and best.score > 0.999 and len(reader._side) == 4
            writer.checkpoint()  # the file replaced: the reader maps the new one
            assert Path(reader.search(vec, 1)[0].item.path).name == files[8].name and not reader._side
            assert len(reader._graph) == 10
            gone = writer.db.execute("SELECT id FROM items WHERE path = ?", (str(files[8]),)).fetchone()[0]
            writer._delete_rows([gone])
            assert all(h.id != gone for h in reader.search(vec, 10)) and len(reader.search(vec, 10)) == 9
            with pytest.raises(MedcError, match="open for searching only"):
                reader.add(items, np.zeros((len(items), reader.dim), np.float32))
        finally:
            reader.close()
            writer.close()

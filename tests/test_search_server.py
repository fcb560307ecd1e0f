"""Similar-case search in `medc serve --index` and `medc listen --index`, over real HTTP and real DICOM networking.

The index is built by the library (runtime/retrieval.add_paths) from real images (skimage), generated ones and
pydicom's test files, on the tiny MedSigLIP bundle; the server answers POST /v1/search and /v1/index on a real uvicorn
(ThreadServer), `medc serve` and `medc listen` run as subprocesses, and dcmtk's storescu sends to the listener."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("usearch", reason="the embedding index needs the retrieval extra: pip install 'medc[retrieval]'")
pytest.importorskip("uvicorn", reason="medc serve needs the serve extra: pip install 'medc[serve]'")
pydicom = pytest.importorskip("pydicom")

from test_listen import PATIENT_ID, Node, _series, _sop, _store  # noqa: E402
from test_serve import KEY, ThreadServer  # noqa: E402

from medc.runtime import load  # noqa: E402
from medc.runtime.listen import read_status  # noqa: E402
from medc.runtime.retrieval import add_paths, bundle_record, embedding_dim, query_vector  # noqa: E402
from medc.runtime.vectorindex import DB_NAME, VectorIndex, patient_hash  # noqa: E402

SALT = b"a site salt of at least sixteen bytes"
DICOM = ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "US1_UNCR.dcm")
TEXT = "a chest radiograph with a tension pneumothorax"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass(frozen=True)
class Site:
    """An archive, its index (made by the library) and what the library answers for TEXT."""

    archive: Path
    index: Path
    salt_file: Path
    dim: int
    record: dict  # the bundle record: empty indexes of the same bundle are made from it
    library: list[tuple[int, float]]  # (id, score) of the library's search for TEXT, best first

    def empty_index(self, path: Path) -> Path:
        VectorIndex.create(path, self.dim, self.record).close()
        return path


def _png(path: Path, seed: int) -> Path:
    """A distinct image: a smooth random field, 96 px."""
    from PIL import Image

    base = np.random.default_rng(seed).random((6, 6, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.kron(base, np.ones((16, 16, 1))) * 255).astype(np.uint8)).save(path)
    return path


def _url(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".dcm": "application/dicom"}[path.suffix]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _dicom(folder: Path, source: str = "MR_small.dcm", patient_id: str | None = "IDX-PATIENT-1") -> Path:
    """A pydicom test file as a new instance (new UIDs), with or without a Patient ID."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file(source))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if patient_id is None:
        del ds.PatientID
    else:
        ds.PatientID = patient_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory, bundle_fp32, real_images) -> Site:
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("site")
    archive = root / "archive"
    for i in range(6):
        _png(archive / "png" / ("effusion" if i % 2 else "normal") / f"g{i}.png", i)
    (archive / "real").mkdir()
    for p in real_images:
        (archive / "real" / p.name).write_bytes(p.read_bytes())
    (archive / "dicom").mkdir()
    for name in DICOM:
        (archive / "dicom" / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    salt_file = root / "salt"
    salt_file.write_bytes(SALT)
    with load(bundle_fp32) as pipe:
        dim, record = embedding_dim(pipe), bundle_record(pipe)
        with VectorIndex.create(root / "index", dim, record) as idx:
            report = add_paths(idx, pipe, [archive / "png", archive / "real", archive / "dicom"], SALT,
                               labels_from_folders=True)  # png/normal/…, png/effusion/…: labelled by sub-folder
            assert report.added == 6 + 3 + 4 and not report.failed
            vec, _ = query_vector(idx, pipe, text=TEXT)
            library = [(h.id, h.score) for h in idx.search(vec, 10)]
    return Site(archive, root / "index", salt_file, dim, record, library)


@pytest.fixture(scope="module")
def server(bundle_fp32, site):
    s = ThreadServer([bundle_fp32], api_key=KEY, index=str(site.index), index_salt_file=str(site.salt_file),
                     max_images=4, max_batch=4)
    yield s
    s.stop()


def _post(server, path: str, body, headers=AUTH) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def _results(r: httpx.Response) -> list[dict]:
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["object"] == "list" and got["model"] == "medsiglip-tiny"
    scores = [h["score"] for h in got["results"]]
    assert scores == sorted(scores, reverse=True)  # best first
    assert "patient_hash" not in r.text  # an answer never carries it
    return got["results"]


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    assert "Traceback" not in r.text
    return err


def test_search_by_image_text_filters_and_instance(server, site, real_images):
    # every image finds itself first: PNG, JPEG and DICOM sent as data URLs, as /v1/embeddings takes them
    dicom = site.archive / "dicom"
    for path in [*real_images, site.archive / "png" / "normal" / "g0.png", dicom / "CT_small.dcm",
                 dicom / "MR_small.dcm"]:
        hits = _results(_post(server, "/v1/search", {"image": _url(path), "k": 3}))
        assert len(hits) == 3 and Path(hits[0]["path"]).name == path.name and hits[0]["score"] > 0.99, hits[0]

    # text: the library's ranking (the same vector through the server's text batcher, the same index)
    hits = _results(_post(server, "/v1/search", {"text": TEXT}))
    assert [(h["id"], pytest.approx(h["score"], abs=1e-5)) for h in hits] == site.library
    assert len(hits) == 10

    # filters: DICOM metadata and labels
    ct = _results(_post(server, "/v1/search", {"text": TEXT, "filters": {"modality": "CT"}}))
    assert [h["modality"] for h in ct] == ["CT"] and ct[0]["study_date"] == "20040119"
    assert [h["modality"] for h in _results(_post(server, "/v1/search",
                                                  {"text": TEXT, "filters": {"body_part": "CHEST"}}))] == ["CR"]
    effusions = _results(_post(server, "/v1/search", {"text": "x", "k": 20, "filters": {"label": "effusion"}}))
    assert len(effusions) == 3 and all(h["labels"] == ["effusion"] for h in effusions)
    assert _results(_post(server, "/v1/search", {"text": TEXT, "filters": {"modality": "MG", "label": "normal"}})) == []

    # an indexed instance: its nearest neighbours, itself left out
    sop = _sop(dicom / "CT_small.dcm")
    like = _results(_post(server, "/v1/search", {"sop_uid": sop, "k": 5, "model": "medsiglip-tiny"}))
    assert len(like) == 5 and sop not in {h.get("sop_uid") for h in like}
    _error(_post(server, "/v1/search", {"sop_uid": "1.2.3.4.5"}), 404, "item_not_found")


def test_index_add_then_search(server, site, tmp_path):
    png = _png(tmp_path / "new.png", 99)
    mr = _dicom(tmp_path)
    r = _post(server, "/v1/index", {"images": [_url(png), _url(mr), _url(png)], "labels": ["fresh"]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["object"], got["model"], got["added"], got["known"]) == ("index.add", "medsiglip-tiny", 2, 1)
    first, dicom, again = got["items"]
    assert first["added"] and first["key"].startswith("sha256:") and not again["added"]
    assert again["key"] == first["key"] and [i["index"] for i in got["items"]] == [0, 1, 2]
    assert dicom == {"index": 1, "key": _sop(mr), "added": True, "sop_uid": _sop(mr), "modality": "MR",
                     "study_uid": str(pydicom.dcmread(mr).StudyInstanceUID),
                     "series_uid": str(pydicom.dcmread(mr).SeriesInstanceUID), "study_date": "20040826"}

    # searchable at once: by image, by label, by key
    hits = _results(_post(server, "/v1/search", {"image": _url(png), "k": 2}))
    assert hits[0]["key"] == first["key"] and hits[0]["score"] > 0.999 and hits[0]["labels"] == ["fresh"]
    assert "path" not in hits[0]  # an image sent inline has none
    fresh = _results(_post(server, "/v1/search", {"text": "x", "filters": {"label": "fresh"}}))
    assert {h["key"] for h in fresh} == {first["key"], _sop(mr)}
    assert first["key"] not in {h["key"] for h in _results(_post(server, "/v1/search", {"sop_uid": first["key"]}))}

    # sent again: nothing added
    again = _post(server, "/v1/index", {"images": [_url(mr), _url(png)]}).json()
    assert (again["added"], again["known"]) == (0, 2) and not any(i["added"] for i in again["items"])

    # the Patient ID only as its salted hash (read beside the server: SQLite in WAL mode takes readers)
    with sqlite3.connect(site.index / DB_NAME) as db:
        stored = db.execute("SELECT patient_hash FROM items WHERE sop_uid = ?", (_sop(mr),)).fetchone()[0]
    assert stored == patient_hash(SALT, "IDX-PATIENT-1")
    assert b"IDX-PATIENT-1" not in (site.index / DB_NAME).read_bytes()
    metrics = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert 'medc_index_items_added_total{model="medsiglip-tiny"} 2' in metrics


def test_auth_limits_and_bad_input(server, site):
    png = _url(site.archive / "png" / "normal" / "g0.png")
    for path, body in (("/v1/search", {"text": "x"}), ("/v1/index", {"images": [png]})):
        _error(_post(server, path, body, headers={}), 401, "invalid_api_key")
        _error(_post(server, path, body, headers={"Authorization": "Bearer wrong-key-0123456789"}), 401,
               "invalid_api_key")
    bad = [
        ("/v1/search", {}, "invalid_value", None),
        ("/v1/search", {"text": "x", "sop_uid": "1.2"}, "invalid_value", "sop_uid"),
        ("/v1/search", {"text": "x", "k": 0}, "invalid_value", "k"),
        ("/v1/search", {"text": "x", "k": 101}, "invalid_value", "k"),
        ("/v1/search", {"text": "x", "k": "3"}, "invalid_type", "k"),
        ("/v1/search", {"text": "   "}, "invalid_value", "text"),
        ("/v1/search", {"text": "x", "filters": {"patient_hash": "x"}}, "invalid_value", "filters"),
        ("/v1/search", {"text": "x", "filters": {"modality": 3}}, "invalid_type", "filters"),
        ("/v1/search", {"text": "x", "filters": ["modality"]}, "invalid_type", "filters"),
        ("/v1/search", {"text": "x", "where": "modality=CT"}, "unsupported_parameter", "where"),
        ("/v1/search", {"image": "http://example.org/a.png"}, "unsupported_image_url", "image"),
        ("/v1/search", {"image": "data:image/png;base64,AAAA"}, "invalid_image", "image"),
        ("/v1/index", {"images": [png], "paths": ["/etc"]}, "unsupported_parameter", "paths"),
        ("/v1/index", {"images": [png] * 5}, "too_many_images", "images"),
        ("/v1/index", {"images": png}, "invalid_type", "images"),
        ("/v1/index", {"images": [png], "labels": [""]}, "invalid_value", "labels"),
        ("/v1/index", {"images": ["data:application/dicom;base64,AAAA"]}, "invalid_image", "images[0]"),
    ]
    for path, body, code, param in bad:
        assert _error(_post(server, path, body), 400, code)["param"] == param, body
    _error(_post(server, "/v1/search", {"text": "x", "model": "gpt-4"}), 404, "model_not_found")
    _error(_post(server, "/v1/search", {"image": "data:image/gif;base64,R0lGODlhAQABAAAAACw="}), 415,
           "unsupported_media_type")
    r = httpx.post(server.url + "/v1/index", content=b"x" * (33 << 20), headers=AUTH)
    _error(r, 413, "body_too_large")


def test_no_salt_and_no_index(bundle_fp32, site, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDC_INDEX_SALT_FILE", raising=False)
    index = site.empty_index(tmp_path / "nosalt")
    s = ThreadServer([bundle_fp32], index=str(index))
    try:
        named = _dicom(tmp_path / "named")
        err = _error(_post(s, "/v1/index", {"images": [_url(named)]}, {}), 400, "salt_required")
        assert "--index-salt-file" in err["message"] and err["param"] == "images[0]"
        anonymous = _dicom(tmp_path / "anonymous", patient_id=None)
        r = _post(s, "/v1/index", {"images": [_url(anonymous)]}, {})
        assert r.status_code == 200 and r.json()["added"] == 1, r.text
    finally:
        s.stop()
    # closed on shutdown: the graph written, nothing left pending in SQLite
    with sqlite3.connect(index / DB_NAME) as db:
        assert db.execute("SELECT count(*) FROM pending").fetchone()[0] == 0
    with VectorIndex.open(index) as idx:
        assert len(idx) == len(idx._graph) == 1

    plain = ThreadServer([bundle_fp32])
    try:
        for path, body in (("/v1/search", {"text": "x"}), ("/v1/index", {"images": [_url(anonymous)]})):
            err = _error(_post(plain, path, body, {}), 501, "index_not_configured")
            assert "--index INDEX" in err["message"]
    finally:
        plain.stop()


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "medc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_serve_searches_an_index_another_process_writes(bundle_fp32, site, tmp_path):
    """A listener (here: the library, holding the writer's lock) adds; the server beside it searches what is added,
    as it is added, and refuses to add itself (409)."""
    index = site.empty_index(tmp_path / "shared")
    png = _png(tmp_path / "new" / "x.png", 99)
    with load(bundle_fp32) as pipe, VectorIndex.open(index) as writer:
        s = ThreadServer([bundle_fp32], index=str(index))
        try:
            assert _error(_post(s, "/v1/index", {"images": [_url(png)]}, {}), 409, "index_read_only")
            add_paths(writer, pipe, [png])  # committed and written
            r = _post(s, "/v1/search", {"image": _url(png), "k": 1}, {})
            assert r.status_code == 200 and r.json()["results"][0]["path"] == str(png), r.text
        finally:
            s.stop()


def test_serve_refuses_another_bundles_index(bundle_int8, site, tmp_path):
    index = site.empty_index(tmp_path / "fp32-index")
    r = _cli("serve", bundle_int8, "--index", index, "--port", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "embeddings of two builds are not comparable" in r.stderr and "serving" not in r.stderr, r.stderr


def test_listen_adds_each_instance_once(bundle_fp32, bundle_int8, site, tmp_path):
    index = site.empty_index(tmp_path / "index")
    node = Node(bundle_fp32, tmp_path / "out", "--index", str(index), "--index-salt-file", str(site.salt_file))
    node.start()
    try:
        two = _series(tmp_path / "ct", 2)
        sops = {_sop(p) for p in two}
        r = _store(node.port, two)
        assert r.returncode == 0, r.stderr
        node.wait_results(sops)
        with sqlite3.connect(index / DB_NAME) as db:  # the instance is in the index before its result is written
            rows = db.execute("SELECT sop_uid, patient_hash, modality FROM items").fetchall()
        assert {row[0] for row in rows} == sops and len(rows) == 2
        assert {row[1] for row in rows} == {patient_hash(SALT, PATIENT_ID)} and {row[2] for row in rows} == {"CT"}

        assert _store(node.port, two).returncode == 0  # sent again: answered as duplicates, not added again
        end = time.time() + 20
        while read_status(node.out)["counters"]["duplicates"] < 2:
            assert time.time() < end, node.log.read_text()
            time.sleep(0.1)
    finally:
        node.stop()
    assert PATIENT_ID not in node.log.read_text()
    with VectorIndex.open(index) as idx:
        assert len(idx) == len(idx._graph) == 2
        assert idx.db.execute("SELECT count(*) FROM pending").fetchone()[0] == 0  # closed with the worker

    # another bundle's index is refused at startup, before the node listens
    r = _cli("listen", bundle_int8, "--out", tmp_path / "out2", "--port", "0", "--index", index)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "embeddings of two builds are not comparable" in r.stderr and "listening as" not in r.stderr, r.stderr


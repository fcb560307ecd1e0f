"""POST /dicomweb/studies (STOW-RS, DICOM PS3.18 10.5) on a real server, through a real STOW-RS client
(dicomweb-client) and by hand: instances stored and fsync'd before the answer, results equal to the pipeline run
directly on the same read_dicom pixels, SRs written and retrievable, bad parts failed with a reason while good ones
succeed, auth and limits, and no patient name in logs or answers."""

from __future__ import annotations

import io
import json
import logging
import os
import time

import httpx
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
dicomweb_client = pytest.importorskip("dicomweb_client")
pytest.importorskip("uvicorn")

from pydicom.data import get_testdata_file  # noqa: E402
from test_serve import KEY, ThreadServer  # noqa: E402

from medc.runtime import stow  # noqa: E402
from medc.runtime.dicom import read_dicom  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
CT, MR, SR = (get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "test-SR.dcm"))
BOUNDARY = "medc-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
SECRET = "Doe^Janet^Quimby"


@pytest.fixture(scope="module")
def server(bundle_fp32, gemma_fp32, tmp_path_factory):
    s = ThreadServer([bundle_fp32, gemma_fp32], api_key=KEY, dicom_store=str(tmp_path_factory.mktemp("store")),
                     max_stow_instances=4, max_body_mb=1.0, max_tokens_cap=64)
    yield s
    s.stop()




def _client(server, key=True):
    return dicomweb_client.DICOMwebClient(url=server.url + "/dicomweb", headers=AUTH if key else None)


def _encoded(ds) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds)
    return buf.getvalue()


def _multipart(parts: list[bytes], types=None) -> bytes:
    types = types or ["application/dicom"] * len(parts)
    return b"".join(f"\r\n--{BOUNDARY}\r\nContent-Type: {t}\r\n\r\n".encode() + p
                    for p, t in zip(parts, types)) + f"\r\n--{BOUNDARY}--".encode()


def _post(server, body: bytes, params=None, headers=None, content_type=CONTENT_TYPE) -> httpx.Response:
    return httpx.post(server.url + "/dicomweb/studies", content=body, params=params, timeout=60,
                      headers={**AUTH, "Content-Type": content_type, **(headers or {})})


def _results(answer) -> dict:
    """medc's results from a Store Instances Response (a pydicom Dataset or DICOM JSON)."""
    if isinstance(answer, dict):
        return json.loads(answer[stow.RESULTS_TAG]["Value"][0])
    return json.loads(answer[0x0077, 0x1001].value)


def _error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err


def _scores(siglip, pixels, labels):
    probs = 1 / (1 + np.exp(-siglip.logits(siglip.embed_images([pixels]), siglip.embed_texts(labels))))
    return {label: float(p) for label, p in zip(labels, probs[0])}


def test_store_and_classify_with_dicomweb_client(server, pipelines, monkeypatch):
    siglip, _ = pipelines
    synced = []
    real_fsync = os.fsync

    def fsync(fd):  # records what was fsync'd: the files and folders of every stored instance
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    datasets = [pydicom.dcmread(CT), pydicom.dcmread(MR)]
    t0 = time.perf_counter()
    answer = _client(server).store_instances(datasets=datasets)
    elapsed = time.perf_counter() - t0
    monkeypatch.setattr(os, "fsync", real_fsync)

    refs = answer.ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [d.SOPInstanceUID for d in datasets]
    assert [r.ReferencedSOPClassUID for r in refs] == [d.SOPClassUID for d in datasets]
    assert "FailedSOPSequence" not in answer
    store = server.state.store
    for ds in datasets:
        path = store / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert path.read_bytes() == _encoded(ds)  # the bytes the client sent
        # Durable before the answer came back: the file fsync'd (under its temporary name, then renamed) and the
        # folder holding its new name.
        assert any(p.startswith(f"{path.parent}/.{ds.SOPInstanceUID}.") for p in synced), synced
        assert str(path.parent) in synced

    results = _results(answer)
    assert results["model"] == "medsiglip-tiny" and len(results["results"]) == 2
    for ds, got, src in zip(datasets, results["results"], (CT, MR)):
        assert got["status"] == "stored" and got["sop_instance_uid"] == ds.SOPInstanceUID
        assert got["study_instance_uid"] == ds.StudyInstanceUID and got["modality"] == ds.Modality
        want = _scores(siglip, read_dicom(src)[0].pixels, ["normal", "abnormal"])
        assert [s["label"] for s in got["scores"]] == sorted(want, key=want.get, reverse=True)
        for s in got["scores"]:
            assert s["score"] == pytest.approx(want[s["label"]], abs=1e-5)
        # The SR, retrievable over WADO-RS by the same client.
        sr = got["sr"]
        assert sr["retrieve_url"].endswith(f"/studies/{sr['study_instance_uid']}/series/{sr['series_instance_uid']}"
                                           f"/instances/{sr['sop_instance_uid']}")
        back = _client(server).retrieve_instance(sr["study_instance_uid"], sr["series_instance_uid"],
                                                 sr["sop_instance_uid"])
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert back.StudyInstanceUID == ds.StudyInstanceUID
        assert back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    print(f"STOW-RS of 2 instances with MedSigLIP and SRs: {elapsed * 1e3:.0f} ms")

    # Labels from the query string, and plain JSON for clients that ask for it.
    r = _post(server, _multipart([_encoded(datasets[0])]), params={"labels": "effusion,pneumothorax"},
              headers={"Accept": "application/json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    got = r.json()["results"][0]
    want = _scores(siglip, read_dicom(CT)[0].pixels, ["effusion", "pneumothorax"])
    assert {s["label"]: pytest.approx(s["score"], abs=1e-5) for s in got["scores"]} == want
    assert r.json()["stow"]["00081199"]["Value"][0]["00081155"]["Value"] == [datasets[0].SOPInstanceUID]


def test_medgemma_prompt(server, pipelines):
    _, gemma = pipelines
    answer = _client(server).store_instances(
        datasets=[pydicom.dcmread(CT)],
        additional_params={"model": "medgemma-tiny", "prompt": "Any fracture?", "max_tokens": "5"})
    got = _results(answer)["results"][0]
    want = gemma.generate("Any fracture?", images=[read_dicom(CT)[0].pixels], max_new_tokens=5)
    assert got["text"] == want and got["prompt"] == "Any fracture?" and got["finish_reason"] in ("stop", "length")
    assert got["sr"]["sop_instance_uid"]


def test_bad_parts_fail_with_reasons_while_good_ones_are_stored(server):
    ct = _encoded(pydicom.dcmread(CT))
    sr = open(SR, "rb").read()
    r = _post(server, _multipart([ct, b"not a DICOM file at all", ct[:len(ct) // 2], sr]))
    assert r.status_code == 202 and r.headers["content-type"] == "application/dicom+json", r.text[:300]
    body = r.json()
    assert [i["00081155"]["Value"][0] for i in body["00081199"]["Value"]] == [pydicom.dcmread(CT).SOPInstanceUID]
    failed = body["00081198"]["Value"]
    reasons = [f["00081197"]["Value"][0] for f in failed]
    assert reasons == [stow.CANNOT_UNDERSTAND, stow.CANNOT_UNDERSTAND, stow.SOP_CLASS_NOT_SUPPORTED]
    assert failed[2]["00081155"]["Value"] == [pydicom.dcmread(SR).SOPInstanceUID]
    results = _results(body)["results"]
    assert [x["status"] for x in results] == ["stored", "failed", "failed", "failed"]
    assert all(x["message"] for x in results[1:])
    # A part that is not application/dicom, and a request of failures only: 409.
    r = _post(server, _multipart([ct, sr], ["image/png", "application/dicom"]))
    assert r.status_code == 409, r.text[:300]
    assert "00081199" not in r.json() and len(r.json()["00081198"]["Value"]) == 2


def test_auth_and_limits(server):
    ct = _encoded(pydicom.dcmread(CT))
    with pytest.raises(Exception) as e:  # requests' HTTPError: the client raises on 401
        _client(server, key=False).store_instances(datasets=[pydicom.dcmread(CT)])
    assert "401" in str(e.value)
    r = httpx.post(server.url + "/dicomweb/studies", content=_multipart([ct]), headers={"Content-Type": CONTENT_TYPE})
    _error(r, 401, "invalid_api_key")

    _error(_post(server, _multipart([ct] * 5)), 400, "too_many_instances")  # --max-stow-instances 4
    _error(_post(server, _multipart([ct] * 30)), 413, "body_too_large")  # --max-body-mb 1
    _error(_post(server, _multipart([ct]), content_type="application/json"), 415, "unsupported_media_type")
    _error(_post(server, _multipart([ct]), content_type='multipart/related; type="application/dicom+json"; '
                                                        f"boundary={BOUNDARY}"), 415, "unsupported_media_type")
    _error(_post(server, _multipart([ct]), content_type="multipart/related"), 400, "invalid_multipart")
    _error(_post(server, b"--other\r\n\r\nx\r\n--other--"), 400, "invalid_multipart")
    _error(_post(server, _multipart([ct]), params={"frobnicate": "1"}), 400, "unsupported_parameter")
    _error(_post(server, _multipart([ct]), params={"model": "gpt-4"}), 404, "model_not_found")
    _error(_post(server, _multipart([ct]), params={"model": "medgemma-tiny", "max_tokens": "0"}), 400,
           "invalid_value")

    # An image over the pixel limits is refused from its header, before its pixel data is decoded.
    big = pydicom.dcmread(CT)
    big.Rows = big.Columns = 9000
    r = _post(server, _multipart([_encoded(big)]))
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [stow.OUT_OF_RESOURCES]
    assert "9000x9000" in _results(r.json())["results"][0]["message"]

    # Without --dicom-store the route says how to turn it on.
    store, server.state.store = server.state.store, None
    try:
        _error(_post(server, _multipart([ct])), 501, "dicom_store_not_configured")
    finally:
        server.state.store = store
    r = httpx.get(server.url + "/dicomweb/studies/1.2/series/3.4/instances/5.6", headers=AUTH)
    _error(r, 404, "instance_not_found")
    r = httpx.get(server.url + "/dicomweb/studies/..%2F..%2Fetc/series/3.4/instances/5.6", headers=AUTH)
    assert r.status_code == 404


def test_no_patient_name_in_logs_or_answers(server, caplog):
    ds = pydicom.dcmread(CT)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRET, "PHI-778899", "19510203"
    broken = _encoded(ds)[:3000]  # failures must not quote the file either
    with caplog.at_level(logging.DEBUG):
        answers = [_post(server, _multipart([_encoded(ds), broken]), headers={"Accept": accept})
                   for accept in ("application/dicom+json", "application/json")]
        answers.append(_post(server, _multipart([_encoded(ds)]), params={"model": "medgemma-tiny", "max_tokens": "3"}))
    for r in answers:
        assert r.status_code in (200, 202)
        for secret in (SECRET, "Janet", "PHI-778899", "19510203"):
            assert secret not in r.text
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "STOW-RS" in logged
    for secret in (SECRET, "Janet", "PHI-778899", "19510203"):
        assert secret not in logged


def test_parser_against_email():
    """stow.split against the standard library's email parser on the same body: equal parts, far less time (the
    measurement behind runtime/stow.py's choice)."""
    import email.parser
    import email.policy

    parts = [os.urandom(1 << 20) for _ in range(8)]
    body = b"".join(f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p for p in parts) \
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    t0 = time.perf_counter()
    ours = stow.split(body, stow.boundary(CONTENT_TYPE), 64)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {CONTENT_TYPE}\r\n\r\n".encode() + body)
    theirs = [p.get_payload(decode=True) for p in msg.iter_parts()]
    t_email = time.perf_counter() - t0
    assert [bytes(p.data) for p in ours] == theirs == parts
    print(f"8 MiB, 8 parts: stow.split {t_ours * 1e3:.1f} ms, email.parser {t_email * 1e3:.1f} ms")
    assert t_ours < t_email

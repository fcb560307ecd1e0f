"""`medc listen`: a real DICOM node under real tools. dcmtk's echoscu/storescu (what modalities and PACS admins use)
and Orthanc (a real PACS) talk to a `medc listen` subprocess on loopback; results and SRs are read back with pydicom
and highdicom. Nothing about DICOM or the network is mocked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

PATIENT = "Quixotic^Zebulon"  # the known name the PHI test looks for
PATIENT_ID = "PHI-ID-732901"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dcmtk(name: str) -> str:
    """dcmtk's own binary (a pyenv shim of the same name may come first on PATH)."""
    for path in (f"/usr/bin/{name}", shutil.which(name)):
        if path and os.path.exists(path):
            r = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
            if "dcmtk" in (r.stdout + r.stderr).lower() or "offis" in (r.stdout + r.stderr).lower():
                return path
    pytest.skip(f"dcmtk's {name} is not installed (apt-get install dcmtk)")


def _series(folder: Path, n: int, source: str = "CT_small.dcm", modality: str | None = None,
            patient: str = PATIENT) -> list[Path]:
    """n instances of one new study/series, made from a pydicom test file with new UIDs and a known patient."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file(source))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = patient, PATIENT_ID
    if modality:
        ds.Modality = modality
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        if "ImagePositionPatient" in ds:
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        p = folder / f"{i:03d}.dcm"
        ds.save_as(p)
        paths.append(p)
    return paths


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class Node:
    """A `medc listen` subprocess, its log in a file."""

    def __init__(self, bundle: Path, out: Path, *args: str, port: int | None = None):
        self.port = port or _free_port()
        self.out = out
        self.log = out.parent / f"{out.name}-{time.time_ns()}.log"
        self.args = [sys.executable, "-m", "medc.cli", "-v", "listen", str(bundle), "--out", str(out),
                     "--port", str(self.port), *args]
        self.proc = None

    def start(self, timeout: float = 60) -> Node:
        self._log = open(self.log, "w")  # noqa: SIM115  (closed in stop(); the subprocess writes to it)
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        end = time.time() + timeout
        while "listening as" not in self.log.read_text():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.time() < end, self.log.read_text()
            time.sleep(0.1)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self._log.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def results(self) -> set[str]:
        return {p.name[:-5] for p in (self.out / "results").glob("*.json")}

    def wait_results(self, sops, timeout: float = 60) -> None:
        end = time.time() + timeout
        while not set(sops) <= self.results():
            assert time.time() < end, f"missing results: {set(sops) - self.results()}\n{self.log.read_text()}"
            time.sleep(0.1)


def _store(port: int, files, aet: str = "MODALITY", called: str = "MEDC") -> subprocess.CompletedProcess:
    return subprocess.run([_dcmtk("storescu"), "-aet", aet, "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60, check=False)


def test_listen_echo_store_series_sr_phi_reject_and_corrupt(bundle_fp32, tmp_path):
    """C-ECHO; a CT series and an MR instance by storescu; a JSON result and a TID 1500 SR each, referencing the right
    instance; the patient's name nowhere in logs or JSON; an AE title not allowed is rejected; a corrupt dataset and
    garbage on the socket do not stop the node."""
    echoscu = _dcmtk("echoscu")
    node = Node(bundle_fp32, tmp_path / "out", "--allow-aet", "MODALITY,OTHER", "--labels", "normal,pneumothorax")
    node.start()
    try:
        assert subprocess.run([echoscu, "-aet", "MODALITY", "127.0.0.1", str(node.port)], check=False).returncode == 0
        ct = _series(tmp_path / "ct", 3)
        mr = _series(tmp_path / "mr", 1, "MR_small.dcm")
        r = _store(node.port, ct + mr)
        assert r.returncode == 0, r.stderr
        sops = [_sop(p) for p in ct + mr]
        node.wait_results(sops)

        # a rejected AE title: no association, nothing stored
        rej = _store(node.port, ct[:1], aet="INTRUDER")
        assert rej.returncode != 0 and "reject" in (rej.stdout + rej.stderr).lower()

        # garbage on the socket, then a dataset whose pixel data is cut short: the node keeps answering
        with socket.create_connection(("127.0.0.1", node.port)) as s:
            s.sendall(b"\x01\x00\x00\x00\xff\xffnot a PDU" * 50)
        bad = _series(tmp_path / "bad", 1)[0]
        ds = pydicom.dcmread(bad)
        ds.PixelData = ds.PixelData[:100]
        ds.save_as(bad)
        assert _store(node.port, [bad]).returncode == 0
        bad_sop = _sop(bad)
        end = time.time() + 30
        while not (node.out / "failed" / f"{bad_sop}.json").exists():
            assert time.time() < end, node.log.read_text()
            time.sleep(0.1)
        assert json.loads((node.out / "failed" / f"{bad_sop}.json").read_text())["reason"]
        assert (node.out / "failed" / f"{bad_sop}.dcm").exists()  # kept for --retry-failed
        assert node.alive()
        assert subprocess.run([echoscu, "-aet", "OTHER", "127.0.0.1", str(node.port)], check=False).returncode == 0

        deadline = time.monotonic() + 15  # the status file is rewritten every 0.5 s from the worker's counters
        while True:
            status = json.loads(subprocess.run([sys.executable, "-m", "medc.cli", "listen", "--status",
                                                str(node.out)], capture_output=True, text=True, check=True).stdout)
            done = status["counters"]["failed"] == 1 and status["counters"]["received"] == 5
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert done, status["counters"]
    finally:
        node.stop()

    for p, sop in zip(ct + mr, sops):
        src = pydicom.dcmread(p)
        rec = json.loads((node.out / "results" / f"{sop}.json").read_text())
        assert rec["sop_instance_uid"] == sop and set(rec["scores"]) == {"normal", "pneumothorax"}
        assert rec["clinical_use"] is False and "random weights" in rec["warning"]
        sr = hd.sr.srread(node.out / "results" / f"{sop}.sr.dcm")
        assert isinstance(sr, hd.sr.Comprehensive3DSR) and sr.SOPInstanceUID == rec["sr"]["sop_instance_uid"]
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == PATIENT_ID  # filed with its study
        ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert ev.SeriesInstanceUID == src.SeriesInstanceUID
        assert ev.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop
        assert "random weights" in sr.SeriesDescription
        tid1500 = sr.content  # highdicom's parsed view of the measurement report
        groups = tid1500.get_image_measurement_groups()
        assert len(groups) == 1 and groups[0].tracking_uid
        algo = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in groups[0][0].ContentSequence
                if i.ValueType == "TEXT"}  # TID 4019 in the group
        assert algo["Algorithm Name"] == "medc medsiglip-tiny" and "Algorithm Version" in algo
        finding = [i for i in groups[0][0].ContentSequence if i.ValueType == "CODE"]
        assert finding[0].ConceptNameCodeSequence[0].CodeMeaning == "Finding"
        assert finding[0].ConceptCodeSequence[0].CodingSchemeDesignator == "99MEDC"
        assert finding[0].ConceptCodeSequence[0].CodeMeaning == rec["finding"]
        assert sorted(m.value for m in groups[0].get_measurements()) == pytest.approx(sorted(rec["scores"].values()))
        texts = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT"]
        assert any("Not for diagnostic use" in t and "RANDOM WEIGHTS" in t for t in texts)
        assert PATIENT_ID not in json.dumps(rec) and "Zebulon" not in json.dumps(rec)

    logs = node.log.read_text()
    assert "Zebulon" not in logs and PATIENT_ID not in logs
    assert not any(sop in logs for sop in sops)  # UIDs appear hashed only
    for f in (node.out / "results").glob("*.json"):
        assert "Zebulon" not in f.read_text() and PATIENT_ID not in f.read_text()


def test_listen_kill9_mid_queue_then_restart(bundle_fp32, tmp_path):
    """kill -9 with instances acknowledged but not inferred: a restart gives every one its result, none twice."""
    files = _series(tmp_path / "ct", 24)
    sops = {_sop(p) for p in files}
    out = tmp_path / "out"
    node = Node(bundle_fp32, out, "--threads", "1").start()
    assert _store(node.port, files).returncode == 0  # every instance acknowledged = durable
    node.stop(signal.SIGKILL)
    queued = {p.stem for p in (out / "incoming").glob("*.dcm")}
    assert queued, "the node finished the queue before the kill: send more instances"
    assert queued | node.results() >= sops  # nothing acknowledged is lost, even before the restart
    first_log = node.log.read_text()

    again = Node(bundle_fp32, out, port=node.port).start()
    try:
        again.wait_results(sops)
    finally:
        again.stop()
    assert not list((out / "incoming").glob("*.dcm")) and len(list((out / "done").glob("*.dcm"))) == len(sops)
    import re
    from collections import Counter

    from medc.runtime.listen import uid_hash

    inferred = Counter(re.findall(r"inferred ([0-9a-f]{10}) in", first_log + again.log.read_text()))
    # none inferred twice, except possibly the one killed between its SR and its JSON (the redo writes the same SR
    # instance: its UIDs derive from the source and the bundle); the one killed after its JSON but before its log line
    # has no line at all
    assert set(inferred) <= {uid_hash(s) for s in sops} and len(inferred) >= len(sops) - 1
    assert sum(n > 1 for n in inferred.values()) <= 1


def _orthanc(tmp_path: Path, modality_port: int, dicom: int | None = None):
    exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not os.path.exists(exe):
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    http, dicom = _free_port(), dicom or _free_port()
    cfg = {"Name": "medc-test", "StorageDirectory": str(tmp_path / "orthanc"), "IndexDirectory": str(tmp_path / "orthanc"),
           "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomModalities": {"medc": ["MEDC", "127.0.0.1", modality_port]},
           "Plugins": [], "DicomCheckCalledAet": False}
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([exe, str(tmp_path / "orthanc.json")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http}"
    end = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/system", timeout=1)
            break
        except OSError:
            assert proc.poll() is None and time.time() < end, "Orthanc did not start"
            time.sleep(0.2)
    return proc, url, dicom


def _rest(url: str, data: bytes | None = None):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_listen_with_orthanc_both_ways(bundle_fp32, tmp_path):
    """Orthanc sends an instance to medc listen (/modalities/medc/store); medc forwards its SR back to Orthanc, which
    files it under the right study."""
    port = _free_port()
    proc, url, orthanc_dicom = _orthanc(tmp_path, port)
    node = Node(bundle_fp32, tmp_path / "out", "--forward", f"127.0.0.1:{orthanc_dicom}:ORTHANC",
                "--forward-untrusted", port=port)
    try:
        node.start()
        src = _series(tmp_path / "cr", 1)[0]
        ds = pydicom.dcmread(src)
        orthanc_id = _rest(url + "/instances", src.read_bytes())["ID"]
        _rest(url + "/modalities/medc/store", json.dumps({"Resources": [orthanc_id], "Synchronous": True}).encode())
        node.wait_results([str(ds.SOPInstanceUID)])
        sr_uid = json.loads((node.out / "results" / f"{ds.SOPInstanceUID}.json").read_text())["sr"]["sop_instance_uid"]
        end = time.time() + 30
        while True:
            found = _rest(url + "/tools/find", json.dumps({"Level": "Instance", "Expand": True, "Query": {
                "StudyInstanceUID": str(ds.StudyInstanceUID), "Modality": "SR"}}).encode())
            if found:
                break
            assert time.time() < end, node.log.read_text()
            time.sleep(0.2)
        assert found[0]["MainDicomTags"]["SOPInstanceUID"] == sr_uid
        series = _rest(url + f"/series/{found[0]['ParentSeries']}")
        study = _rest(url + f"/studies/{series['ParentStudy']}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == str(ds.StudyInstanceUID)
        end = time.time() + 10
        while json.loads((node.out / "status.json").read_text())["counters"]["forwarded"] < 1:
            assert time.time() < end
            time.sleep(0.2)
        assert (node.out / "forwarded" / str(ds.SOPInstanceUID)).exists() and not list((node.out / "outbox").iterdir())
    finally:
        node.stop()
        proc.terminate()
        proc.wait(30)


def test_forward_refuses_random_weights_unless_told(bundle_fp32, tmp_path):
    r = subprocess.run([sys.executable, "-m", "medc.cli", "listen", str(bundle_fp32), "--out", str(tmp_path / "o"),
                        "--forward", "127.0.0.1:104:PACS"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode != 0 and "--forward-untrusted" in r.stderr


def test_listen_medgemma_2d_and_volume(gemma_fp32, tmp_path):
    """MedGemma: one answer per 2D instance, and one volume prompt per CT series once it has gone quiet; the text is
    the SR's Narrative Summary."""
    node = Node(gemma_fp32, tmp_path / "out", "--series-quiet", "1", "--max-new-tokens", "4",
                "--prompt", "Describe the findings.").start()
    try:
        ct = _series(tmp_path / "ct", 3)
        cr = _series(tmp_path / "cr", 1, modality="OT")
        assert _store(node.port, ct + cr).returncode == 0
        series_uid = str(pydicom.dcmread(ct[0]).SeriesInstanceUID)
        node.wait_results([_sop(cr[0]), f"series-{series_uid}", *map(_sop, ct)], timeout=90)
    finally:
        node.stop()
    for key in (_sop(cr[0]), f"series-{series_uid}"):
        rec = json.loads((node.out / "results" / f"{key}.json").read_text())
        assert isinstance(rec["text"], str) and rec["prompt"] == "Describe the findings."
        sr = hd.sr.srread(node.out / "results" / f"{key}.sr.dcm")
        summary = [i for i in sr.ContentSequence if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111412"]
        assert len(summary) == 1
    rec = json.loads((node.out / "results" / f"series-{series_uid}.json").read_text())
    assert sorted(rec["sop_instance_uids"]) == sorted(map(_sop, ct))
    assert json.loads((node.out / "results" / f"{_sop(ct[0])}.json").read_text())["result"] == f"series-{series_uid}"


def _wait(cond, what: str, node: Node | None = None, timeout: float = 30) -> None:
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, f"timed out waiting for {what}\n{node.log.read_text() if node else ''}"
        time.sleep(0.1)


def test_listen_worker_killed_is_restarted(bundle_fp32, tmp_path):
    """Inference runs in a worker process: kill -9 it mid-queue and the listener starts another, which gives every
    acknowledged instance its result (none inferred twice but the one in hand), while C-STOREs keep being answered."""
    files = _series(tmp_path / "ct", 16)
    sops = {_sop(p) for p in files}
    node = Node(bundle_fp32, tmp_path / "out", "--threads", "1").start()
    try:
        assert _store(node.port, files[:12]).returncode == 0
        pid = json.loads((node.out / "status.json").read_text())["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        assert _store(node.port, files[12:]).returncode == 0  # answered while no worker runs
        node.wait_results(sops)
        status = json.loads((node.out / "status.json").read_text())
        _wait(lambda: json.loads((node.out / "status.json").read_text())["worker_restarts"] >= 1, "the restart", node)
        assert node.alive()
    finally:
        node.stop()
    import re
    from collections import Counter

    inferred = Counter(re.findall(r"inferred ([0-9a-f]{10}) in", node.log.read_text()))
    assert len(inferred) >= len(sops) - 1 and sum(n > 1 for n in inferred.values()) <= 1
    assert status["counters"]["received"] == 16
    assert not list((node.out / "incoming").glob("*.dcm"))


def test_listen_retry_failed_end_to_end(bundle_fp32, tmp_path):
    """An instance whose SR cannot be written (its path is taken by a folder: a disk problem, not a mock) fails and is
    kept; after the problem is fixed, `--retry-failed` infers it and it gets its result."""
    src = _series(tmp_path / "cr", 1)[0]
    sop = _sop(src)
    out = tmp_path / "out"
    (out / "results" / f"{sop}.sr.dcm").mkdir(parents=True)
    node = Node(bundle_fp32, out).start()
    try:
        assert _store(node.port, [src]).returncode == 0
        _wait(lambda: (out / "failed" / f"{sop}.json").exists(), "the failure", node)
    finally:
        node.stop()
    assert (out / "failed" / f"{sop}.dcm").exists() and not (out / "results" / f"{sop}.json").exists()
    (out / "results" / f"{sop}.sr.dcm").rmdir()
    again = Node(bundle_fp32, out, "--retry-failed", port=node.port).start()
    try:
        again.wait_results([sop])
    finally:
        again.stop()
    assert "queued 1 failed instance(s) again" in again.log.read_text()
    assert not list((out / "failed").iterdir()) and (out / "done" / f"{sop}.dcm").exists()
    assert hd.sr.srread(out / "results" / f"{sop}.sr.dcm").SOPInstanceUID == \
        json.loads((out / "results" / f"{sop}.json").read_text())["sr"]["sop_instance_uid"]


def test_listen_keep_days_retention(bundle_fp32, tmp_path):
    """--keep-days deletes a received instance once it is older than the limit, has its result and, with --forward,
    its SR was acknowledged; everything else stays."""
    files = _series(tmp_path / "ct", 3)
    a, b, c = (_sop(p) for p in files)
    out = tmp_path / "out"
    node = Node(bundle_fp32, out).start()
    try:
        assert _store(node.port, files).returncode == 0
        node.wait_results([a, b, c])
    finally:
        node.stop()
    done = out / "done"
    _wait(lambda: len(list(done.glob("*.dcm"))) == 3, "done/")
    d = "1.2.3.999.1"  # in done/ without a result: never deleted
    shutil.copy(done / f"{a}.dcm", done / f"{d}.dcm")
    old = time.time() - 10 * 86400
    for sop in (a, b, d):
        os.utime(done / f"{sop}.dcm", (old, old))
    for sop in (a, c):  # the PACS acknowledged their SRs
        (out / "forwarded" / sop).touch()
    again = Node(bundle_fp32, out, "--keep-days", "1", "--forward", f"127.0.0.1:{_free_port()}:PACS",
                 "--forward-untrusted", port=node.port).start()
    try:
        _wait(lambda: not (done / f"{a}.dcm").exists(), "the retention of the old, answered, forwarded instance", again)
        time.sleep(1)
    finally:
        again.stop()
    assert (done / f"{b}.dcm").exists()  # old, but its SR not acknowledged
    assert (done / f"{c}.dcm").exists()  # forwarded, but new
    assert (done / f"{d}.dcm").exists()  # old, but no result
    assert (out / "results" / f"{a}.json").exists()  # results are kept


def _tls_files(folder: Path) -> dict[str, Path]:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("medc test CA")).issuer_name(name("medc test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    out = {"ca": folder / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("server", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))), ("client", x509.DNSName("modality"))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([san]), critical=False).sign(ca_key, hashes.SHA256()))
        out[f"{who}_cert"], out[f"{who}_key"] = folder / f"{who}.pem", folder / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return out


def test_listen_tls_with_client_certificates(bundle_fp32, tmp_path):
    """--tls-cert/--tls-key/--tls-ca: a client with a certificate the CA signed stores over TLS; plain TCP and a TLS
    client without a certificate get no association."""
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    tls = _tls_files(tmp_path / "tls")
    node = Node(bundle_fp32, tmp_path / "out", "--tls-cert", str(tls["server_cert"]), "--tls-key",
                str(tls["server_key"]), "--tls-ca", str(tls["ca"])).start()

    def associate(cert: bool | None):
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CTImageStorage)
        if cert is None:
            return ae.associate("127.0.0.1", node.port, ae_title="MEDC")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls["ca"]))
        if cert:
            ctx.load_cert_chain(str(tls["client_cert"]), str(tls["client_key"]))
        return ae.associate("127.0.0.1", node.port, ae_title="MEDC", tls_args=(ctx, "127.0.0.1"))

    try:
        src = _series(tmp_path / "ct", 1)[0]
        assoc = associate(cert=True)
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(src)).Status == 0x0000
        assoc.release()
        node.wait_results([_sop(src)])
        for cert in (None, False):
            assoc = associate(cert)
            assert not assoc.is_established
            assoc.abort()
        assert node.alive()
    finally:
        node.stop()


def test_listen_forward_backs_off_until_the_pacs_is_up(bundle_fp32, tmp_path):
    """--forward to a PACS that is down: the SR waits in outbox/ with back-off; Orthanc started afterwards on that port
    receives it, exactly once."""
    port, pacs = _free_port(), _free_port()
    # --series-quiet 600: no series aggregate SR joins the one forward this test counts
    node = Node(bundle_fp32, tmp_path / "out", "--forward", f"127.0.0.1:{pacs}:ORTHANC", "--forward-untrusted",
                "--series-quiet", "600", port=port).start()
    proc = None
    try:
        src = _series(tmp_path / "cr", 1)[0]
        sop = _sop(src)
        assert _store(node.port, [src]).returncode == 0
        node.wait_results([sop])
        _wait(lambda: "forward of the SR" in node.log.read_text(), "a failed forward", node)
        assert (node.out / "outbox" / f"{sop}.sr.dcm").exists() and not (node.out / "forwarded" / sop).exists()
        proc, url, _ = _orthanc(tmp_path, port, dicom=pacs)
        _wait(lambda: (node.out / "forwarded" / sop).exists(), "the forward once Orthanc is up", node, timeout=40)
        study = str(pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID)
        time.sleep(1.5)  # room for a second (wrong) send
        found = _rest(url + "/tools/find", json.dumps({"Level": "Instance", "Query": {
            "StudyInstanceUID": study, "Modality": "SR"}}).encode())
        assert len(found) == 1
        assert not list((node.out / "outbox").iterdir())
        assert node.log.read_text().count("forwarded the SR") == 1
        _wait(lambda: json.loads((node.out / "status.json").read_text())["counters"]["forwarded"] == 1, "the counter")
    finally:
        node.stop()
        if proc is not None:
            proc.terminate()
            proc.wait(30)


def test_listen_secondary_capture_and_siglip_series_aggregate(bundle_fp32, tmp_path):
    """--secondary-capture: each result also as a Secondary Capture image in the source's study; a MedSigLIP series
    gets one aggregate (JSON and a series SR over its instances) once it has gone quiet."""
    node = Node(bundle_fp32, tmp_path / "out", "--secondary-capture", "--series-quiet", "1")
    node.start()
    try:
        ct = _series(tmp_path / "ct", 3)
        assert _store(node.port, ct).returncode == 0
        sops = [_sop(p) for p in ct]
        series_uid = str(pydicom.dcmread(ct[0]).SeriesInstanceUID)
        node.wait_results([*sops, f"series-{series_uid}"], timeout=60)
    finally:
        node.stop()
    src = pydicom.dcmread(ct[0])
    sc = pydicom.dcmread(node.out / "results" / f"{sops[0]}.sc.dcm")
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.pixel_array.max() > 0 and sc.pixel_array.min() == 0  # text on a background
    rec = json.loads((node.out / "results" / f"{sops[0]}.json").read_text())
    assert rec["sc"]["sop_instance_uid"] == sc.SOPInstanceUID

    agg = json.loads((node.out / "results" / f"series-{series_uid}.json").read_text())
    assert agg["count"] == 3 and sorted(agg["sop_instance_uids"]) == sorted(sops)
    for v in agg["aggregate"].values():
        assert v["count"] == 3 and v["max"] >= v["mean"] and v["max_sop_instance_uid"] in sops
    sr = hd.sr.srread(node.out / "results" / f"series-{series_uid}.sr.dcm")
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert sorted(r.ReferencedSOPInstanceUID for r in ev.ReferencedSOPSequence) == sorted(sops)
    assert sr.SOPInstanceUID == agg["sr"]["sop_instance_uid"] != rec["sr"]["sop_instance_uid"]
    assert not list((node.out / "series-agg").iterdir())

"""`medc listen`: a DICOM node next to the scanner. A Storage SCP (and C-ECHO) whose every arrival gets an AI result.

Durable before success: a C-STORE is answered Success only once the instance is written, fsync'd and renamed into
`incoming/` (and the directory fsync'd); inference runs behind it from that on-disk queue, in a separate worker
process (`python -m medc.runtime.listen`, started and restarted by the listener) so that ONNX Runtime and SR building
never hold the GIL or the cores that answer C-STORE. The worker holds `worker.lock` (one worker per --out, even when
an orphan of a killed listener is finishing) and exits when the listener's end of its stdin closes. The spool under
--out is the whole state, moved between folders by atomic renames:

    tmp/                   partial writes (never read)
    incoming/SOP.dcm       received, not yet inferred          series/SERIES/SOP.dcm  MedGemma CT/MR: waiting for the
    done/SOP.dcm           inferred (kept for --keep-days)                            series to go quiet
    failed/SOP.dcm, .json  inference failed (the reason); `--retry-failed` moves them back to incoming/
    results/SOP.json       UIDs, scores, text (never patient identifiers); results/SOP.sr.dcm the Structured Report;
                           results/SOP.sc.dcm its rendering as a Secondary Capture (--secondary-capture)
    results/series-SERIES  MedGemma: the volume prompt's result; MedSigLIP: the series aggregate (max/mean per label)
    series-agg/SERIES/SOP  MedSigLIP: instances with a result whose series aggregate is not yet written
    outbox/SOP.sr.dcm      SRs (and .sc.dcm) still to --forward (hard links); forwarded/SOP (SOP.sc) once acknowledged
    status.json            counters: received, inferred, failed, forwarded, queue depth (worker.json: the worker's)

A result JSON is written last, after the SR, and marks an instance done: after a kill at any point a restart finds
every instance either still in incoming/ (inferred again: the SR's UIDs derive from the source and the bundle, so a
redo writes the same instance) or with its result (moved on, not inferred again). With --index (MedSigLIP), the
worker adds each instance's image embedding (the one zero-shot used) to the embedding index, keyed by its SOP Instance
UID, before writing its result: an instance with a result is in the index, and a redo adds nothing twice. Log lines
carry hashed UIDs, sizes and timings only; exception messages (which may quote dataset values) go to
failed/SOP.json, not to the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from medc.errors import MedcError
from medc.system import fsync_dir

log = logging.getLogger("medc.listen")

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
VOLUME_MODALITIES = {"CT", "MR"}
DIRS = ("tmp", "incoming", "done", "failed", "results", "outbox", "forwarded", "series", "series-agg")

# Image storage SOP classes the SCP accepts (PS3.4 B.5): single- and enhanced multi-frame.
STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image - For Processing
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture Image
)


def uid_hash(uid: str) -> str:
    """What a log line says instead of a UID: the first 10 hex digits of its sha256."""
    return hashlib.sha256(str(uid).encode()).hexdigest()[:10]


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write `data` to `path` so that a reader (or a restart after a crash) sees the whole file or none of it."""
    tmp = tmp_dir / f"{path.name}.{os.getpid()}.{threading.get_ident()}.part"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def move(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


@dataclass
class ListenConfig:
    out: Path
    ae_title: str = "MEDC"
    host: str = "127.0.0.1"
    port: int = 11112
    labels: list[str] = field(default_factory=lambda: ["normal", "abnormal"])
    prompt: str = "Describe the findings."
    max_new_tokens: int = 64
    allow_aet: list[str] | None = None  # None: any calling AE title
    forward: tuple[str, int, str] | None = None  # host, port, AE title
    forward_untrusted: bool = False  # send SRs from random-weight or degraded bundles too
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # given: clients must present a certificate it signed
    workers: int = 1
    quiet_s: float = 10.0  # a series is complete after this long without a new instance
    secondary_capture: bool = False  # also render each result as a Secondary Capture image (PACS without SR display)
    volume_slices: int = 4
    sr_class: str = "comprehensive3d"
    keep_days: float | None = None
    dicom_config: Path | None = None
    threads: int | None = None
    trust: object = None
    max_backoff_s: float = 300.0
    worker_process: bool = True  # False: inference in threads of the SCP's process (slower acks; for comparison)
    trust_paths: list[str] | None = None  # what the worker process loads `trust` from (else MEDC_TRUSTED_KEYS)
    index: Path | None = None  # MedSigLIP: add every instance's image embedding to this embedding index (--index)
    index_salt_file: Path | None = None  # the site's salt for Patient ID hashes; None: MEDC_INDEX_SALT_FILE, if set

    def __post_init__(self):
        self.out = Path(self.out)
        # Paths, also when they come back from the JSON line that configures the worker process.
        self.index = Path(self.index).resolve() if self.index else None
        self.index_salt_file = Path(self.index_salt_file).resolve() if self.index_salt_file else None
        if len(self.ae_title.encode()) > 16 or not self.ae_title.strip():
            raise MedcError(f"--ae-title {self.ae_title!r} must be 1 to 16 characters.")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise MedcError("--tls-cert and --tls-key go together.")


def parse_forward(value: str) -> tuple[str, int, str]:
    host, _, rest = value.rpartition(":") if value.count(":") >= 2 else ("", "", "")
    host, _, port = host.rpartition(":")
    if not host or not port.isdigit() or not rest:
        raise MedcError(f"--forward {value!r}: expected HOST:PORT:AET, e.g. pacs.local:104:PACS.")
    return host, int(port), rest


# -- the node ---------------------------------------------------------------------------------------------------------
class Counters:
    NAMES = ("received", "inferred", "failed", "forwarded", "duplicates", "rejected")

    def __init__(self, previous: dict | None = None):
        self._lock = threading.Lock()
        self.values = {k: int((previous or {}).get(k, 0)) for k in self.NAMES}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.values[name] += n


class Listener:
    """The node: `with Listener(bundle, cfg) as node: node.serve_forever()`; `start()`/`stop()` for tests."""

    def __init__(self, bundle: str | Path, cfg: ListenConfig, worker_only: bool = False):
        from medc.manifest import Manifest, read_json_file
        from medc.runtime.serve import degraded
        from medc.signing import digest

        self.cfg = cfg
        self.bundle = Path(bundle)
        self.manifest = Manifest.read(self.bundle)
        self.bundle_sha256 = digest(read_json_file(self.bundle))
        self.degraded = degraded(self.manifest)
        self.clinical_use = self.manifest.model.get("clinical_use", True) is not False and \
            self.manifest.model.get("source", {}).get("kind") not in ("random", "tiny")
        self.family = self.manifest.model.get("family")
        if cfg.index is not None:
            self._check_index_config(warn=not worker_only)
        if cfg.forward and not (self.clinical_use and not self.degraded) and not cfg.forward_untrusted:
            why = "random weights" if not self.clinical_use else f"a degraded bundle ({', '.join(self.degraded)})"
            raise MedcError(f"--forward would send SRs from {why} to a PACS; they say NOT FOR CLINICAL USE in their "
                            "title and notice, but pass --forward-untrusted to send them anyway.")
        precisions = sorted({c.precision for c in self.manifest.components.values()})
        self.precision = ",".join(precisions)
        self.root = cfg.out
        for d in DIRS:
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.worker_only = worker_only  # the worker process: infers, forwards, retains; writes worker.json
        if not worker_only:
            for stale in (self.root / "tmp").iterdir():  # partial writes of a killed run
                stale.unlink(missing_ok=True)
        if cfg.worker_process and cfg.trust is not None and not cfg.trust_paths and not worker_only:
            from medc.signing import Trust

            if Trust.from_env() is None:
                raise MedcError("a worker process loads its trusted keys from trust_paths or MEDC_TRUSTED_KEYS.")
        self.counters = Counters(self._read_counters("worker.json" if worker_only else "status.json"))
        self.queue: queue.Queue = queue.Queue()
        self._queued: set[str] = set()
        self._qlock = threading.Lock()
        self._model_lock = threading.Lock()  # MedGemma's decoder state is per pipeline
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self.pipeline = None
        self._text_embeds = None
        self._dicom_config = None
        self.ack_ms: list[float] = []
        self._child: subprocess.Popen | None = None
        self.worker_restarts = 0
        self._index = None  # runtime.vectorindex.VectorIndex, opened by the process that infers (_open_index)
        self._index_lock = threading.Lock()  # one SQLite connection and one graph, shared by the worker threads
        self._index_saves = None
        self._salt: bytes | None = None

    def _check_index_config(self, warn: bool) -> None:
        """--index, refused at startup: for MedSigLIP bundles only (the index holds image embeddings), and with a
        salt file that reads. The bundle and salt are checked against the index by the process that infers."""
        from medc.runtime.vectorindex import DB_NAME, read_salt

        if self.family != "siglip":
            raise MedcError(f"--index needs a MedSigLIP bundle: an embedding index holds MedSigLIP image "
                            f"embeddings, and {self.bundle} is a {self.family} model. Run a second `medc listen` "
                            "with the MedSigLIP bundle that made the index, or leave --index out.")
        if not (self.cfg.index / DB_NAME).is_file():
            raise MedcError(f"--index {self.cfg.index} is not an embedding index; create one with `medc index create "
                            f"{self.cfg.index} --bundle {self.bundle}`.")
        if read_salt(self.cfg.index_salt_file) is None and warn:
            log.warning("--index without --index-salt-file (or MEDC_INDEX_SALT_FILE): instances that name a patient "
                        "fail until it is given (then `medc listen --retry-failed`).")

    def _read_counters(self, name: str) -> dict | None:
        for n in (name, "status.json"):
            try:
                return json.loads((self.root / n).read_text())["counters"]
            except (OSError, ValueError, KeyError):
                continue
        return None

    # -- paths --
    def path(self, where: str, name: str) -> Path:
        return self.root / where / name

    def _enqueue(self, sop: str) -> None:
        with self._qlock:
            if sop in self._queued:
                return
            self._queued.add(sop)
        self.queue.put(sop)

    # -- lifecycle --
    def start(self) -> Listener:
        import pynetdicom  # noqa: F401

        _quiet_libraries()
        if self.cfg.worker_process:
            self._start_child()
            self._spawn(self._supervise, "medc-listen-supervisor")
        else:
            self._start_inference()
        self._server = self._start_server()
        self.write_status()
        return self

    def _start_inference(self) -> None:
        """Load the bundle; start the worker threads, the housekeeping and the forwarder (in this process)."""
        import highdicom  # noqa: F401  (imported before the threads start: concurrent first imports of pydicom
        import pydicom.pixels  # noqa: F401  from two threads can fail on its circular imports)
        from medc.runtime import load

        _quiet_libraries()
        if self.cfg.dicom_config:
            from medc.runtime.dicom import load_config

            self._dicom_config = load_config(self.cfg.dicom_config)
        self.pipeline = load(self.bundle, threads=self.cfg.threads, trust=self.cfg.trust)
        if self.family == "siglip":
            self._text_embeds = self.pipeline.embed_texts(self.cfg.labels)
        if self.cfg.index is not None:
            self._open_index()
        for p in sorted((self.root / "incoming").glob("*.dcm"), key=lambda p: p.stat().st_mtime):
            self._enqueue(p.stem)
        for i in range(max(1, self.cfg.workers)):
            self._spawn(self._worker, f"medc-listen-worker-{i}")
        self._spawn(self._housekeeping, "medc-listen-housekeeping")
        if self.cfg.forward:
            self._spawn(self._forwarder, "medc-listen-forward")

    # -- the worker process, seen from the listener --
    def _start_child(self, timeout: float = 300.0) -> None:
        """Start `python -m medc.runtime.listen` and wait until it has loaded the bundle (its errors are raised here)."""
        cfg = {f: getattr(self.cfg, f) for f in self.cfg.__dataclass_fields__ if f != "trust"}
        line = json.dumps({"bundle": str(self.bundle), "cfg": cfg, "log_level": logging.getLogger().level},
                          default=str)
        child = subprocess.Popen([sys.executable, "-m", "medc.runtime.listen"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        child.stdin.write(line + "\n")
        child.stdin.flush()  # stdin stays open: its EOF (our exit, even by kill -9) tells the worker to stop
        ready = _readline(child.stdout, timeout)
        if not ready.startswith("ready"):
            child.kill()
            child.wait()
            raise MedcError(json.loads(ready)["error"] if ready.startswith("{") else
                            f"the inference worker did not start (exit status {child.poll()}).")
        self._child = child

    def _supervise(self) -> None:
        """Restart a dead worker (back-off up to a minute); write status.json."""
        delay = 1.0
        while not self._stop.wait(0.5):
            try:
                if self._child is not None and self._child.poll() is not None and not self._stop.is_set():
                    log.warning("the inference worker exited (status %s); restarting it in %.0f s",
                                self._child.returncode, delay)
                    if self._stop.wait(delay):
                        return
                    self.worker_restarts += 1
                    try:
                        self._start_child()
                        delay = 1.0
                    except MedcError as e:
                        log.error("the inference worker cannot start: %s", e)
                        delay = min(delay * 2, 60.0)
                self.write_status()
            except Exception:
                log.exception("supervisor error")

    def _stop_child(self, timeout: float) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stdin.close()  # the worker finishes the instance in hand and exits
            child.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()

    # -- the worker process, seen from inside --
    def run_worker(self) -> None:
        """The worker process: one per --out (worker.lock), until stdin closes or SIGTERM."""
        import fcntl
        import signal

        lock = open(self.root / "worker.lock", "a")  # noqa: SIM115  (held for the life of the process)
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for an orphan of a killed listener to finish its instance
        os.nice(10)  # below the listener: a C-STORE's acknowledgement comes before any inference
        self._start_inference()
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the listener, which closes our stdin
        print("ready", flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), self._stop.set()), daemon=True).start()
        while not self._stop.wait(0.05):  # pick up what the listener stored
            for p in sorted(os.scandir(self.root / "incoming"), key=lambda e: e.name):
                if p.name.endswith(".dcm"):
                    self._enqueue(p.name[:-4])
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join(60)
        self._close_index()
        self.write_status()

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let workers finish the instance in hand (the rest stay queued on disk)."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        self._stop_child(timeout)
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join(timeout)
        self._close_index()
        self.write_status()
        if self.pipeline is not None:
            self.pipeline.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def serve_forever(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def retry_failed(self) -> int:
        """Move failed instances back to incoming/ (their reasons are dropped); returns how many."""
        n = 0
        for p in sorted((self.root / "failed").glob("*.dcm")):
            move(p, self.path("incoming", p.name))
            self.path("failed", p.stem + ".json").unlink(missing_ok=True)
            n += 1
        return n

    # -- the embedding index (--index) --
    def _open_index(self) -> None:
        """In the process that infers (the only one that opens the index): refuse another bundle's index or another
        salt before the first instance."""
        from medc.runtime.retrieval import Checkpointer, bundle_record
        from medc.runtime.vectorindex import VectorIndex, read_salt

        salt = read_salt(self.cfg.index_salt_file)
        index = VectorIndex.open(self.cfg.index)
        try:
            index.check_bundle(bundle_record(self.pipeline))
            if salt is not None:
                try:
                    index.check_salt(salt)
                except MedcError:
                    raise MedcError(f"this is not the salt index {self.cfg.index} was made with: its patients' "
                                    "hashes would not match. Give the site's salt file (--index-salt-file FILE or "
                                    "MEDC_INDEX_SALT_FILE).") from None
        except BaseException:
            index.close()
            raise
        self._index, self._salt, self._index_saves = index, salt, Checkpointer()

    def _index_item(self, ds):
        """The instance's index item from its header, before inference: an instance that cannot be indexed (it
        names a patient and there is no salt) fails without spending inference on it."""
        from medc.runtime.retrieval import SaltRequired, dicom_item

        try:
            return dicom_item(ds, self._salt, name="the instance")
        except SaltRequired:
            raise MedcError("the instance names a patient, and --index needs the site's salt to hash its Patient ID "
                            "(the hash is how a patient's data is found and deleted later): restart medc listen "
                            "with --index-salt-file FILE (or MEDC_INDEX_SALT_FILE; `medc index salt FILE` makes "
                            "one), then `medc listen --retry-failed`.") from None

    def _index_add(self, item, embedding: np.ndarray) -> None:
        """Durable when it returns (SQLite commits the row and its vector); an instance indexed before is skipped,
        so a redo after a kill adds nothing twice."""
        with self._index_lock:
            if self._index is None:  # a worker still inferring when stop() gave up waiting for it
                raise MedcError("the index was closed while this instance was inferred (medc listen stopped); "
                                "`medc listen --retry-failed` adds it.")
            self._index_saves.added(self._index, self._index.add([item], embedding))

    def _close_index(self) -> None:
        with self._index_lock:
            if self._index is not None:
                self._index.close()  # writes the graph: a restart has nothing to re-add from SQLite
                self._index = None

    # -- the SCP --
    def _ssl_context(self):
        if not self.cfg.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cfg.tls_cert), str(self.cfg.tls_key))
        if self.cfg.tls_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(self.cfg.tls_ca))
        return ctx

    def _start_server(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.cfg.ae_title)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = False
        ae.require_calling_aet = list(self.cfg.allow_aet or [])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.maximum_associations = 16
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                    (evt.EVT_REJECTED, self._on_rejected)]
        try:
            server = ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers,
                                     ssl_context=self._ssl_context())
        except OSError as e:
            raise MedcError(f"cannot listen on {self.cfg.host}:{self.cfg.port} ({e.strerror or e}).") from None
        # Accepted sockets inherit it (Linux): Nagle never holds a response for the peer's delayed ACK (~40 ms). The
        # same stall on the sender's side (a client without TCP_NODELAY) is the sender's to fix.
        server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return server

    def _on_rejected(self, event) -> None:
        self.counters.add("rejected")
        log.warning("association rejected (calling AE title not in --allow-aet) from %s", event.address[0])

    def _on_store(self, event) -> int:
        t0 = time.perf_counter()
        try:
            sop = str(event.request.AffectedSOPInstanceUID or "")
            if not _UID.fullmatch(sop) or len(sop) > 64:
                log.warning("refused a C-STORE whose SOP Instance UID is not a UID")
                return 0xC210
            name = f"{sop}.dcm"
            if self.path("results", f"{sop}.json").exists() or self.path("done", name).exists():
                self.counters.add("duplicates")
                log.info("instance %s received again: it already has its result", uid_hash(sop))
                return 0x0000
            data = event.encoded_dataset(include_meta=True)
            write_atomic(self.path("incoming", name), data, self.root / "tmp")
        except OSError as e:
            log.error("cannot store an instance under --out (%s): answering Out of Resources", type(e).__name__)
            return 0xA700
        except Exception as e:  # noqa: BLE001  (a dataset pynetdicom cannot encode: refuse it, keep listening)
            log.warning("refused a C-STORE (%s)", type(e).__name__)
            return 0xC210
        ms = (time.perf_counter() - t0) * 1e3
        self.ack_ms.append(ms)
        self.counters.add("received")
        log.info("stored %s (%d bytes) in %.1f ms", uid_hash(sop), len(data), ms)
        if not self.cfg.worker_process:  # else the worker process finds it in incoming/
            self._enqueue(sop)
        return 0x0000

    # -- inference --
    def _worker(self) -> None:
        while not self._stop.is_set():
            sop = self.queue.get()
            if sop is None:
                return
            try:
                self.process(sop)
            except Exception:
                log.exception("worker error on %s", uid_hash(sop))
            finally:  # after processing: a rescan of incoming/ meanwhile does not queue it twice
                with self._qlock:
                    self._queued.discard(sop)

    def process(self, sop: str) -> None:
        import pydicom

        src = self.path("incoming", f"{sop}.dcm")
        if not src.exists():
            return
        if self.path("results", f"{sop}.json").exists():  # killed after the result, before the move
            move(src, self.path("done", src.name))
            return
        t0 = time.perf_counter()
        try:
            ds = pydicom.dcmread(src, stop_before_pixels=True)
            if str(ds.SOPInstanceUID) != sop:
                raise MedcError("the dataset's SOP Instance UID differs from the C-STORE's")
            modality = str(ds.get("Modality", ""))
            if self.family == "gemma3" and modality in VOLUME_MODALITIES:
                series = str(ds.SeriesInstanceUID)
                if not _UID.fullmatch(series):
                    raise MedcError("the Series Instance UID is not a UID")
                d = self.root / "series" / series
                d.mkdir(exist_ok=True)
                move(src, d / src.name)
                log.info("instance %s waits for series %s to complete", uid_hash(sop), uid_hash(series))
                return
            item = self._index_item(ds) if self._index is not None else None
            self._infer([ds], [src], key=sop, item=item)
            if self.family == "siglip" and _UID.fullmatch(str(ds.get("SeriesInstanceUID", ""))):
                self._note_for_series(str(ds.SeriesInstanceUID), sop, src.stat().st_mtime)
        except Exception as e:  # noqa: BLE001  (any failure is recorded with its reason, the instance kept)
            self._fail(sop, src, e)
            return
        move(src, self.path("done", src.name))
        log.info("inferred %s in %.0f ms", uid_hash(sop), (time.perf_counter() - t0) * 1e3)
        self.write_status()

    def _infer(self, datasets: list, paths: list[Path], key: str, folder: Path | None = None, item=None) -> dict:
        """The model on these instances; their SR, then their result JSON, written last. `item`: this instance's
        index item, added with its image embedding before the result is written, so an instance with a result is
        in the index (a kill in between: the redo's add is skipped as known)."""
        from medc.runtime.dicom import read_dicom, read_volume
        from medc.runtime.gemma import max_slices
        from medc.runtime.sr import AiResult

        if folder is not None:  # a CT/MR series for MedGemma: K evenly spaced slices, as many as the context holds
            k = min(self.cfg.volume_slices,
                    max_slices(self.pipeline.assets, self.cfg.prompt, self.cfg.max_new_tokens))
            images = read_volume(folder, max(k, 1), config=self._dicom_config)
        else:
            images = [img for p in paths for img in read_dicom(p, config=self._dicom_config, frames="middle")]
        if not images:
            raise MedcError("no image in the instance")
        result = AiResult(model=self.manifest.model["name"], bundle_sha256=self.bundle_sha256,
                          precision=self.precision, clinical_use=self.clinical_use, degraded=list(self.degraded))
        pixels = [im.pixels for im in images]
        if self.family == "siglip":
            p = self.pipeline
            image_embeds = p.embed_images(pixels[:1])
            probs = 1.0 / (1.0 + np.exp(-p.logits(image_embeds, self._text_embeds)))
            result.scores = {label: float(v) for label, v in zip(self.cfg.labels, probs[0])}
            if item is not None:  # the embedding zero-shot used: the instance is embedded once
                self._index_add(item, image_embeds)
        else:
            result.prompt = self.cfg.prompt
            with self._model_lock:
                result.text = self.pipeline.generate(self.cfg.prompt, images=pixels,
                                                     max_new_tokens=self.cfg.max_new_tokens)
        objects = self._write_objects(key, datasets, result)
        first = datasets[0]
        record = {
            "sop_instance_uid": key if len(datasets) == 1 else None,
            "sop_instance_uids": [str(d.SOPInstanceUID) for d in datasets],
            "study_instance_uid": str(first.StudyInstanceUID), "series_instance_uid": str(first.SeriesInstanceUID),
            "sop_class_uid": str(first.SOPClassUID), "modality": str(first.get("Modality", "")),
            "model": result.model, "bundle_sha256": result.bundle_sha256, "precision": result.precision,
            "clinical_use": result.trustworthy, "warning": result.warning(),
            "scores": result.scores or None, "finding": (result.finding or (None,))[0],
            "prompt": result.prompt, "text": result.text,
            **objects,
        }
        write_atomic(self.path("results", f"{key}.json"), json.dumps(record, indent=1).encode(), self.root / "tmp")
        self.counters.add("inferred")
        return record

    def _write_objects(self, key: str, datasets: list, result) -> dict:
        """Write the SR (and with --secondary-capture the SC) for `key` under results/, link them into outbox/ with
        --forward; return what the result JSON says of them. Their UIDs are fixed by the sources: a redo rewrites the
        same instances."""
        from io import BytesIO

        from medc.runtime.sr import make_sc, make_sr

        made = {"sr": make_sr(datasets, result, self.cfg.sr_class)}
        if self.cfg.secondary_capture:
            made["sc"] = make_sc(datasets, result)
        out = {}
        for kind, ds in made.items():
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            name = f"{key}.{kind}.dcm"
            write_atomic(self.path("results", name), buf.getvalue(), self.root / "tmp")
            if self.cfg.forward and not self.path("forwarded", _forward_marker(name)).exists():
                try:
                    os.link(self.path("results", name), self.path("outbox", name))
                    fsync_dir(self.root / "outbox")
                except FileExistsError:
                    pass
            out[kind] = {"sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID),
                         "sop_class_uid": str(ds.SOPClassUID), "file": name}
        return out

    def _fail(self, sop: str, src: Path, e: Exception) -> None:
        reason = f"{type(e).__name__}: {e}"[:2000]
        if src.exists():
            move(src, self.path("failed", src.name))
        write_atomic(self.path("failed", f"{sop}.json"),
                     json.dumps({"sop_instance_uid": sop, "reason": reason, "time": time.time()}).encode(),
                     self.root / "tmp")
        self.counters.add("failed")
        self.write_status()
        log.warning("inference failed for %s (%s); kept for `medc listen --retry-failed`", uid_hash(sop),
                    type(e).__name__)

    # -- series, status, retention --
    def _housekeeping(self) -> None:
        last_retention = 0.0
        while not self._stop.wait(0.5):
            try:
                self._complete_series()
                if self.family == "siglip":
                    self._aggregate_series()
                if self.cfg.keep_days is not None and time.time() - last_retention > 60:
                    self._retention()
                    last_retention = time.time()
                self.write_status()
            except Exception:
                log.exception("housekeeping error")

    def _complete_series(self) -> None:
        import pydicom

        for d in sorted((self.root / "series").iterdir()):
            files = sorted(d.glob("*.dcm"))
            if not files:
                d.rmdir()
                continue
            if time.time() - max(f.stat().st_mtime for f in files) < self.cfg.quiet_s:
                continue
            key = f"series-{d.name}"
            try:
                if not self.path("results", f"{key}.json").exists():
                    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
                    order = sorted(range(len(files)), key=lambda i: _slice_key(datasets[i]))
                    with_images = self._infer([datasets[i] for i in order], [files[i] for i in order], key, d)
                    log.info("series %s (%d instances) answered", uid_hash(d.name), len(with_images["sop_instance_uids"]))
            except Exception as e:  # noqa: BLE001  (recorded per instance, kept for --retry-failed)
                for f in files:
                    self._fail(f.stem, f, e)
                continue
            for f in files:  # each instance's own result file points to its series' result
                if not self.path("results", f"{f.stem}.json").exists():
                    write_atomic(self.path("results", f"{f.stem}.json"), json.dumps(
                        {"sop_instance_uid": f.stem, "series_instance_uid": d.name, "result": key}).encode(),
                        self.root / "tmp")
                move(f, self.path("done", f.name))
            d.rmdir()

    def _note_for_series(self, series: str, sop: str, arrived: float) -> None:
        """MedSigLIP: mark `sop` (its result written) as part of `series`' aggregate; the mark's mtime is its arrival."""
        if self.path("results", f"series-{series}.json").exists():
            return  # the aggregate is written once
        d = self.root / "series-agg" / series
        d.mkdir(exist_ok=True)
        write_atomic(d / sop, b"", self.root / "tmp")
        os.utime(d / sop, (arrived, arrived))

    def _aggregate_series(self) -> None:
        """MedSigLIP: once a series has had no new instance for --series-quiet seconds and every instance that arrived
        within that window has its result, write its aggregate (per label: max, mean, argmax, count) and a series SR
        over all its instances, once: a present results/series-SERIES.json is never redone."""
        import pydicom
        from medc.runtime.sr import AiResult

        now = time.time()
        queued = []
        for p in (self.root / "incoming").glob("*.dcm"):
            try:
                queued.append(p.stat().st_mtime)
            except FileNotFoundError:  # moved on meanwhile
                pass
        for d in sorted((self.root / "series-agg").iterdir()):
            marks = list(d.iterdir())
            key = f"series-{d.name}"
            if marks and not self.path("results", f"{key}.json").exists():
                last = max(m.stat().st_mtime for m in marks)
                if now - last < self.cfg.quiet_s or any(t < last + self.cfg.quiet_s for t in queued):
                    continue  # not quiet yet, or an instance that arrived in the window is still queued
                try:
                    sops = sorted(m.name for m in marks)
                    records = {sop: json.loads(self.path("results", f"{sop}.json").read_text()) for sop in sops}
                    labels = list(records[sops[0]]["scores"])
                    agg = {}
                    for label in labels:
                        vals = {sop: float(r["scores"][label]) for sop, r in records.items()}
                        top = max(vals, key=vals.get)
                        mean = min(float(np.mean(list(vals.values()))), vals[top])  # rounding never above max
                        agg[label] = {"max": vals[top], "mean": mean,
                                      "max_sop_instance_uid": top, "count": len(vals)}
                    datasets = [pydicom.dcmread(self.path("done", f"{sop}.dcm"), stop_before_pixels=True)
                                for sop in sops]
                    result = AiResult(model=self.manifest.model["name"], bundle_sha256=self.bundle_sha256,
                                      precision=self.precision, clinical_use=self.clinical_use,
                                      degraded=list(self.degraded), scores={k: v["max"] for k, v in agg.items()},
                                      aggregate=f"series max over {len(sops)} instances")
                    objects = self._write_objects(key, datasets, result)
                    first = records[sops[0]]
                    record = {"series_instance_uid": d.name, "study_instance_uid": first["study_instance_uid"],
                              "sop_instance_uids": sops, "count": len(sops), "aggregate": agg,
                              "scores": result.scores, "finding": result.finding[0], "model": result.model,
                              "bundle_sha256": result.bundle_sha256, "precision": result.precision,
                              "clinical_use": result.trustworthy, "warning": result.warning(), **objects}
                    write_atomic(self.path("results", f"{key}.json"), json.dumps(record, indent=1).encode(),
                                 self.root / "tmp")
                    log.info("series %s aggregated over %d instances", uid_hash(d.name), len(sops))
                except Exception as e:  # noqa: BLE001  (e.g. an instance deleted by retention: logged, retried)
                    log.warning("series aggregate for %s failed (%s)", uid_hash(d.name), type(e).__name__)
                    continue
            for m in marks:
                m.unlink(missing_ok=True)
            d.rmdir()
            fsync_dir(d.parent)

    def _retention(self) -> None:
        """Delete instances older than --keep-days, only once their result is written and, with --forward, its SR
        acknowledged."""
        limit = time.time() - self.cfg.keep_days * 86400
        for p in (self.root / "done").glob("*.dcm"):
            try:
                if p.stat().st_mtime > limit:
                    continue
                key = json.loads(self.path("results", f"{p.stem}.json").read_text()).get("result", p.stem)
            except (OSError, ValueError):
                continue
            if self.cfg.forward and not all(self.path("forwarded", m).exists() for m in
                                            [key] + ([f"{key}.sc"] if self.cfg.secondary_capture else [])):
                continue
            p.unlink(missing_ok=True)

    def status(self) -> dict:
        count = lambda d, pat="*.dcm": sum(1 for _ in (self.root / d).glob(pat))
        counters = dict(self.counters.values)
        if self.cfg.worker_process and not self.worker_only:  # what the worker process counted
            worker = self._read_counters("worker.json") or {}
            counters.update({k: int(worker.get(k, counters[k])) for k in ("inferred", "failed", "forwarded")})
        return {"counters": counters, "queue_depth": count("incoming"),
                "series_waiting": count("series", "*/*.dcm"), "failed_kept": count("failed"),
                "forward_pending": count("outbox"), "pid": os.getpid(), "ae_title": self.cfg.ae_title,
                "address": f"{self.cfg.host}:{self.cfg.port}", "updated": time.time(),
                **({"worker_pid": self._child.pid if self._child else None, "worker_restarts": self.worker_restarts}
                   if self.cfg.worker_process and not self.worker_only else {})}

    def write_status(self) -> None:
        name = "worker.json" if self.worker_only else "status.json"
        write_atomic(self.root / name, json.dumps(self.status(), indent=1).encode(), self.root / "tmp")

    # -- forwarding --
    def _forwarder(self) -> None:
        backoff: dict[str, tuple[float, float]] = {}  # name -> (next try, delay)
        while not self._stop.wait(0.5):
            for p in sorted((self.root / "outbox").glob("*.dcm")):
                now = time.time()
                due, delay = backoff.get(p.name, (0.0, 1.0))
                if now < due:
                    continue
                key, kind = _forward_marker(p.name), p.name.split(".")[-2].upper()
                ok, why = self._send(p)
                if ok:
                    write_atomic(self.path("forwarded", key), b"", self.root / "tmp")
                    p.unlink()
                    fsync_dir(p.parent)
                    backoff.pop(p.name, None)
                    self.counters.add("forwarded")
                    log.info("forwarded the %s for %s", kind, uid_hash(key))
                else:
                    backoff[p.name] = (now + delay, min(delay * 2, self.cfg.max_backoff_s))
                    log.warning("forward of the %s for %s failed (%s); retrying in %.0f s", kind, uid_hash(key), why,
                                delay)

    def _send(self, path: Path) -> tuple[bool, str]:
        import pydicom
        from pynetdicom import AE
        from pynetdicom.sop_class import (
            Comprehensive3DSRStorage,
            ComprehensiveSRStorage,
            SecondaryCaptureImageStorage,
        )

        host, port, aet = self.cfg.forward
        ds = pydicom.dcmread(path)
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(Comprehensive3DSRStorage)
        ae.add_requested_context(ComprehensiveSRStorage)
        ae.add_requested_context(SecondaryCaptureImageStorage)
        assoc = ae.associate(host, port, ae_title=aet)
        if not assoc.is_established:
            return False, "no association"
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        return (code == 0x0000, f"status 0x{code:04X}" if code is not None else "no response")


def _forward_marker(name: str) -> str:
    """forwarded/ marker of an outbox file: KEY for KEY.sr.dcm (as before SCs existed), KEY.sc for KEY.sc.dcm."""
    return name[:-len(".sr.dcm")] if name.endswith(".sr.dcm") else name[:-len(".dcm")]


def _slice_key(ds) -> tuple:
    pos = ds.get("ImagePositionPatient")
    return (float(pos[2]) if pos and len(pos) == 3 else 0.0, int(ds.get("InstanceNumber") or 0))


def read_status(out: Path) -> dict:
    try:
        return json.loads((Path(out) / "status.json").read_text())
    except OSError:
        raise MedcError(f"{out} holds no status.json: is it a `medc listen --out` folder?") from None


def _quiet_libraries() -> None:
    for noisy in ("highdicom", "pynetdicom"):  # they log UIDs and AE titles at INFO; keep only their warnings
        lg = logging.getLogger(noisy)
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))


def _readline(stream, timeout: float) -> str:
    """A line from `stream`, or "" after `timeout` seconds or at EOF."""
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return got[0].strip() if got else ""


def _worker_main() -> None:
    """`python -m medc.runtime.listen`: the worker process. Its first stdin line is the listener's config as JSON."""
    spec = json.loads(sys.stdin.readline())
    logging.basicConfig(level=spec["log_level"] or logging.WARNING, format="%(message)s", stream=sys.stderr)
    cfg = spec["cfg"]
    cfg["forward"] = tuple(cfg["forward"]) if cfg["forward"] else None
    cfg["dicom_config"] = Path(cfg["dicom_config"]) if cfg["dicom_config"] else None
    try:
        from medc.signing import Trust

        trust = Trust.load(cfg["trust_paths"]) if cfg["trust_paths"] else Trust.from_env()
        node = Listener(spec["bundle"], ListenConfig(**cfg, trust=trust), worker_only=True)
        node.run_worker()
    except MedcError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        sys.exit(2)


if __name__ == "__main__":
    _worker_main()

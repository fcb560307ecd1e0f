"""AI results as DICOM Structured Reports, in the form IHE AI Results (AIR) uses: a TID 1500 Measurement Report.

`make_sr(sources, result)` -> a highdicom SR dataset (Comprehensive 3D SR by default, Comprehensive SR for viewers
that read only that): procedure reported; one measurement group (TID 1501) with a tracking identifier and UID; the
finding as a coded qualitative evaluation and its score as a numeric measurement, both carrying the algorithm
(TID 4019: name "medc <model>", version, parameters: precision and the bundle's sha256); MedGemma's answer as a TEXT
item (Narrative Summary); a 'not for diagnostic use' notice as a TEXT item (Comment). The SR references its source
instances (evidence and the group's source images), copies the patient and study modules from them (highdicom does),
and is UNVERIFIED. Its series and SOP Instance UIDs derive from the source UIDs and the bundle digest, so writing the
SR again for the same source and bundle gives the same instance (a resend is not a new object).

Free-text labels have no standard code: they are coded in medc's local coding scheme, designator `99MEDC`, with the
label itself as the code meaning and a code value derived from it (`L` + 12 hex digits of its sha256).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from medc import __version__

CODING_SCHEME = "99MEDC"  # medc's local coding scheme (DICOM PS3.16 8.2: private designators start with 99)
NOTICE = "Not for diagnostic use. Produced automatically by medc; results are unverified and must be reviewed."
SR_CLASSES = ("comprehensive3d", "comprehensive")

__all__ = ["CODING_SCHEME", "NOTICE", "SR_CLASSES", "AiResult", "label_code", "make_sc", "make_sr", "render_summary",
           "sc_uids", "sr_uids"]


@dataclass
class AiResult:
    """What a model said about one instance (or one series: several sources)."""

    model: str  # the bundle's model name
    bundle_sha256: str  # the manifest's digest: names the exact bundle
    precision: str
    scores: dict[str, float] = field(default_factory=dict)  # MedSigLIP: label -> probability
    text: str | None = None  # MedGemma's answer
    prompt: str | None = None
    clinical_use: bool = True  # False: random weights
    degraded: list[str] = field(default_factory=list)  # components whose fidelity gate failed
    aggregate: str | None = None  # e.g. "series max over 3 instances": a result over others' results (own UIDs)

    @property
    def trustworthy(self) -> bool:
        return self.clinical_use and not self.degraded

    @property
    def finding(self) -> tuple[str, float] | None:
        if not self.scores:
            return None
        label = max(self.scores, key=self.scores.get)
        return label, float(self.scores[label])

    def warning(self) -> str | None:
        if not self.clinical_use:
            return "built from random weights, NOT FOR CLINICAL USE"
        if self.degraded:
            return f"degraded bundle ({', '.join(self.degraded)} failed the fidelity gate), NOT FOR CLINICAL USE"
        return None


def label_code(label: str):
    from pydicom.sr.coding import Code

    return Code(f"L{hashlib.sha256(label.encode()).hexdigest()[:12].upper()}", CODING_SCHEME, label[:64])


def _uid(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big') >> 6}"  # a UUID-derived UID (PS3.5 B.2), deterministic from the parts


def sr_uids(sources, result: AiResult) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of the SR for these sources from this bundle: fixed before anything is sent."""
    first = sources[0]
    series = _uid("medc-sr-series", str(first.SeriesInstanceUID), result.bundle_sha256)
    keys = sorted(str(s.SOPInstanceUID) for s in sources)
    extra = ("aggregate", result.aggregate) if result.aggregate else ()
    return series, _uid("medc-sr", *keys, result.bundle_sha256, result.prompt or "", *sorted(result.scores), *extra)


def sc_uids(sources, result: AiResult) -> tuple[str, str]:
    """(series UID, SOP Instance UID) of the Secondary Capture rendering of the same result: as fixed as the SR's."""
    series, sop = sr_uids(sources, result)
    return _uid("medc-sc-series", series), _uid("medc-sc", sop)


def render_summary(result: AiResult, size: tuple[int, int] = (768, 576)):
    """The result as text on a black grayscale image (a uint8 array): for PACS viewers that display no SR."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 18)
    except OSError:
        font = ImageFont.load_default()
    lines = [f"medc {result.model} (medc {__version__}, {result.precision})"]
    if result.aggregate:
        lines.append(result.aggregate)
    if result.finding is not None:
        lines.append(f"Finding: {result.finding[0]} ({result.finding[1]:.3f})")
        lines += [f"  {label}: {p:.3f}" for label, p in sorted(result.scores.items(), key=lambda kv: -kv[1])]
    if result.prompt is not None:
        lines.append(f"Q: {result.prompt}")
    if result.text is not None:
        lines.append("A: " + (result.text or "(empty)"))
    warning = result.warning()
    lines += ["", *(["*** " + warning.upper() + " ***"] if warning else []), NOTICE]
    width = max(20, size[0] // 10)
    wrapped = [w for line in lines for w in (textwrap.wrap(line, width) or [""])]
    img = Image.new("L", size, 0)
    draw = ImageDraw.Draw(img)
    y = 12
    for line in wrapped:
        if y > size[1] - 24:
            draw.text((12, y), "...", fill=255, font=font)
            break
        draw.text((12, y), line, fill=255, font=font)
        y += 24
    return np.asarray(img, dtype=np.uint8)


def make_sc(sources, result: AiResult):
    """A Secondary Capture image (a highdicom dataset) rendering `result` as text, in the sources' study (its own
    series), with UIDs derived like the SR's: writing it again gives the same instance."""
    import highdicom as hd

    sources = list(sources)
    series_uid, sop_uid = sc_uids(sources, result)
    sc = hd.sc.SCImage.from_ref_dataset(
        sources[0], render_summary(result), photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=9902, sop_instance_uid=sop_uid,
        instance_number=1, manufacturer="medc", transfer_syntax_uid="1.2.840.10008.1.2.1",
        patient_orientation=("L", "P"))  # highdicom wants one for PATIENT; a rendered page has none: emptied below
    sc.PatientOrientation = None  # type 2: present, empty
    warning = result.warning()
    sc.SeriesDescription = ("medc AI summary" + (f" - {warning}" if warning else ""))[:64]
    sc.ImageComments = (NOTICE if not warning else f"{warning.upper()}. {NOTICE}")[:10240]
    sc.BurnedInAnnotation = "YES"
    return sc


def make_sr(sources, result: AiResult, sr_class: str = "comprehensive3d"):
    """An SR (a highdicom dataset, ready for `.save_as` or a C-STORE) for `sources` (pydicom datasets of one study:
    one instance, or a series for a volume prompt); the pixel data is not needed and not read."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if sr_class not in SR_CLASSES:
        raise ValueError(f"sr_class must be one of {SR_CLASSES}")
    sources = list(sources)
    series_uid, sop_uid = sr_uids(sources, result)
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"medc {result.model}", version=__version__,
        parameters=[f"precision={result.precision}", f"bundle_sha256={result.bundle_sha256}"])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("medc-device", result.bundle_sha256), name="medc", manufacturer_name="medc",
            model_name=result.model[:64]))
    measurements, evaluations = [], []
    finding = result.finding
    if finding is not None:
        label = finding[0]
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=label_code(label)))
        for name, p in result.scores.items():
            measurements.append(hd.sr.Measurement(
                name=Code(label_code(name).value, CODING_SCHEME, f"Score: {name}"[:64]), value=float(p),
                unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("medc-tracking", sop_uid), identifier="medc AI result"),
        algorithm_id=algorithm, measurements=measurements or None, qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(s.SOPClassUID), str(s.SOPInstanceUID))
                       for s in sources])
    warning = result.warning()
    title = Code("126000", "DCM", "Imaging Measurement Report")
    if warning:
        title = Code("RANDOMW" if not result.clinical_use else "DEGRADED", CODING_SCHEME,
                     f"Imaging Measurement Report ({'random weights' if not result.clinical_use else 'degraded'})")
    procedure = Code("MEDCAI", CODING_SCHEME, "medc AI inference")
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_person_context=None,
                                                                                  observer_device_context=observer),
                                     procedure_reported=procedure, imaging_measurements=[group], title=title)
    container = report[0]
    if result.text is not None:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=Code("111412", "DCM", "Narrative Summary"), value=result.text[:10240] or "(empty)",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    notice = NOTICE if not warning else f"{warning.upper()}. {NOTICE}"
    container.ContentSequence.append(hd.sr.TextContentItem(
        name=Code("121106", "DCM", "Comment"), value=notice,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    cls = hd.sr.Comprehensive3DSR if sr_class == "comprehensive3d" else hd.sr.ComprehensiveSR
    sr = cls(evidence=sources, content=report, series_instance_uid=series_uid, series_number=9901,
             sop_instance_uid=sop_uid, instance_number=1, manufacturer="medc", is_complete=True, is_final=False,
             is_verified=False)
    sr.SeriesDescription = ("medc AI result" + (f" - {warning}" if warning else ""))[:64]
    sr.ContentLabel = "MEDC_AI"
    return sr

"""DICOM in (runtime/dicom.py): pydicom's real test files and files written here with known values, checked pixel by
pixel against hand-computed numbers; every error case; and DICOM wherever images go (medc run, the server, build
calibration)."""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="DICOM needs the dicom extra: pip install 'medc[dicom]'")
from medc.errors import MedcError
from medc.runtime.dicom import (
    CT_WINDOWS,
    DicomConfig,
    DicomImage,
    UnsupportedTransferSyntax,
    is_dicom,
    load_config,
    read_dicom,
    read_volume,
    volume_slices,
)
from medc.runtime.imagelimits import ImageTooLarge
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

PATIENT = ("Doe^Jane", "PID-8817", "19700101", "ACC-5521")  # must never appear in a message


def data(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_testdata_file(name)


def write(path, pixels: np.ndarray, modality="CT", photometric="MONOCHROME2", sop_class="1.2.840.10008.5.1.4.1.1.2",
          series=None, **attrs):
    """A DICOM Part 10 file holding `pixels` (H x W, int16/uint16/uint8, or H x W x 3 uint8), with patient data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = PATIENT
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series or "1.2.3.4.5"
    ds.Modality, ds.PhotometricInterpretation = modality, photometric
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# -- CT: HU, the three windows ----------------------------------------------------------------------------------------
def test_ct_hu_and_three_windows(tmp_path):
    stored = np.array([[-100, 0, 432, 500], [520, 540, 608, 1100]], np.int16)  # signed 16-bit
    f = write(tmp_path / "ct.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000, PixelSpacing=[0.7, 0.8])
    im = read_dicom(f)[0]
    # HU = 2 * stored - 1000: -1200, -1000, -136, 0 / 40, 80, 216, 1200
    hu = stored.astype(float) * 2 - 1000
    assert hu.tolist() == [[-1200, -1000, -136, 0], [40, 80, 216, 1200]]
    r, g, b = (im.pixels[..., c] for c in range(3))
    # R: -1024..1024 -> (HU + 1024) / 2048 * 255, rounded half to even
    assert r.tolist() == [[0, 3, 111, 128], [132, 137, 154, 255]]
    # G: -135..215 (the notebook's soft-tissue window, pinned) -> (HU + 135) / 350 * 255
    assert g.tolist() == [[0, 0, 0, 98], [128, 157, 255, 255]]
    # B: 0..80 (brain) -> HU / 80 * 255
    assert b.tolist() == [[0, 0, 0, 0], [128, 255, 255, 255]]
    assert im.recipe["method"] == "ct_windows" and im.recipe["windows_hu"] == [[-1024, 1024], [-135, 215], [0, 80]]
    assert im.recipe["modality_lut"] == "rescale slope 2 intercept -1000" and im.recipe["signed"]
    assert im.pixel_spacing == (0.7, 0.8) and im.pixels.dtype == np.uint8


def test_ct_green_window_is_the_notebooks():
    # medc pins the MedGemma 1.5 CT notebook's windows, not the serving handler's other G constant.
    assert CT_WINDOWS == ((-1024, 1024), (-135, 215), (0, 80))
    assert DicomConfig().recipe("CT").windows == CT_WINDOWS


def test_real_ct_small_matches_hand_hu():
    ds = pydicom.dcmread(data("CT_small.dcm"))
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    im = read_dicom(data("CT_small.dcm"))[0]
    want_b = np.round(np.clip(hu, 0, 80) / 80 * 255)
    assert np.array_equal(im.pixels[..., 2], want_b.astype(np.uint8))
    want_g = np.round((np.clip(hu, -135, 215) + 135) / 350 * 255)
    assert np.array_equal(im.pixels[..., 1], want_g.astype(np.uint8))
    assert im.ref.modality == "CT" and im.ref.frame is None and im.pixel_spacing == (0.661468, 0.661468)
    assert not any(p in json.dumps(im.recipe) + repr(im.ref) for p in ("CompressedSamples", str(ds.PatientID)))


# -- radiographs: VOI, MONOCHROME1, VOI LUT, pad to square -------------------------------------------------------
def test_cr_window_monochrome1_stretch_and_pad(tmp_path):
    px = np.array([[0, 100, 200, 300, 400, 1000]] * 2, np.uint16)
    f = write(tmp_path / "cr.dcm", px, modality="CR", photometric="MONOCHROME1",
              sop_class="1.2.840.10008.5.1.4.1.1.1", WindowCenter=250, WindowWidth=301)
    im = read_dicom(f)[0]
    # LINEAR (PS3.3 C.11.2.1.2.1), c 250 w 301: (x - 249.5) / 300 + 0.5, clipped -> 0, 0, 0.335, 0.668, 1, 1;
    # stretched over its own min..max (0..1: unchanged), to 8 bits, then inverted (MONOCHROME1)
    unit = np.clip((px[0] - 249.5) / 300 + 0.5, 0, 1)
    want = 255 - np.round(unit * 255).astype(np.uint8)
    assert im.pixels.shape == (6, 6, 3)  # padded to square: 2 rows centred in 6
    assert np.array_equal(im.pixels[2, :, 0], want) and np.array_equal(im.pixels[3, :, 1], want)
    assert not im.pixels[:2].any() and not im.pixels[4:].any()
    assert im.recipe["inverted"] and im.recipe["pad_to_square"] and im.recipe["voi"] == "window center 250 width 301"


def test_voi_lut_sequence(tmp_path):
    px = np.array([[0, 1, 2, 3], [4, 5, 6, 9]], np.uint16)
    item = Dataset()
    item.add_new(0x00283002, "US", [8, 0, 8])  # LUTDescriptor: 8 entries from 0, 8 bits
    item.add_new(0x00283006, "US", [0, 10, 20, 40, 80, 160, 200, 255])  # LUTData
    f = write(tmp_path / "ot.dcm", px, modality="OT", sop_class="1.2.840.10008.5.1.4.1.1.7",
              VOILUTSequence=[item])
    im = read_dicom(f)[0]  # "default" recipe: the file's VOI, no stretch; an input past the LUT takes its last entry
    assert im.pixels[..., 0].tolist() == [[0, 10, 20, 40], [80, 160, 200, 255]]
    assert im.recipe["voi"] == "VOILUTSequence (8 entries, 8 bits)"
    # the same file as a CR: MONOCHROME2, the VOI LUT, then stretched over min..max (here already 0..255)
    f2 = write(tmp_path / "cr.dcm", px, modality="CR", VOILUTSequence=[item])
    assert read_dicom(f2)[0].pixels[0, :, 0].tolist() == [0, 0, 0, 0]  # padding row (2 rows -> 4x4)


def test_real_monochrome1_cr_is_inverted():
    im = read_dicom(data("RG1_UNCR.dcm"))[0]  # CR, MONOCHROME1, 1841 x 1955: padded to 1955 x 1955
    ds = pydicom.dcmread(data("RG1_UNCR.dcm"))
    assert im.pixels.shape == (1955, 1955, 3) and im.recipe["inverted"]
    x = ds.pixel_array.astype(float)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    unit = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    unit = (unit - unit.min()) / (unit.max() - unit.min())
    want = 255 - np.round(unit * 255).astype(np.uint8)
    off = (1955 - 1841) // 2
    assert np.array_equal(im.pixels[:, off:off + 1841, 0], want)


def test_mr_percentiles():
    im = read_dicom(data("MR_small.dcm"))[0]
    x = pydicom.dcmread(data("MR_small.dcm")).pixel_array.astype(float)
    lo, hi = np.percentile(x, (0.5, 99.5))
    assert np.array_equal(im.pixels[..., 0], np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))
    assert im.recipe["method"] == "percentile"


# -- transfer syntaxes and colour -------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed, plain, tol", [
    ("MR_small_RLE.dcm", "MR_small.dcm", 0),  # RLE
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0),  # JPEG 2000 lossless
    ("SC_rgb_rle.dcm", "SC_rgb.dcm", 0),  # RLE colour
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0),  # JPEG lossless colour
    ("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 8),  # YBR_FULL -> RGB
    ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 40),  # JPEG baseline (lossy), YBR_FULL
    ("US1_J2KR.dcm", "US1_UNCR.dcm", 0),  # JPEG 2000 lossless, YBR_RCT
])
def test_compressed_equals_uncompressed(compressed, plain, tol):
    a, b = read_dicom(data(compressed))[0].pixels, read_dicom(data(plain))[0].pixels
    assert a.shape == b.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= tol


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEGLSNearLossless_16.dcm",
                                  "JPEG2000.dcm", "examples_ybr_color.dcm", "gdcm-US-ALOKA-16.dcm",
                                  "ExplVR_BigEnd.dcm", "image_dfl.dcm", "mlut_18.dcm"])
def test_reads(name):
    im = read_dicom(data(name))[0]
    assert im.pixels.ndim == 3 and im.pixels.shape[2] == 3 and im.pixels.dtype == np.uint8 and im.pixels.any()


def test_icc_profile_applied(tmp_path):
    from PIL import ImageCms

    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    f = write(tmp_path / "sc.dcm", rgb, modality="OT", photometric="RGB", sop_class="1.2.840.10008.5.1.4.1.1.7",
              ICCProfile=icc)
    im = read_dicom(f)[0]
    assert im.recipe["icc_profile"] == "applied (to sRGB)" and im.recipe["method"] == "colour"
    assert np.abs(im.pixels.astype(int) - rgb).max() <= 3  # sRGB -> sRGB: close to identity


# -- multi-frame, series, volumes -------------------------------------------------------------------------------------
def test_multiframe_choice():
    f = data("emri_small.dcm")  # MR, 10 frames
    every = pydicom.dcmread(f).pixel_array
    assert [im.ref.frame for im in read_dicom(f, frames="all")] == list(range(10))
    assert read_dicom(f)[0].ref.frame == 4  # middle
    assert [im.ref.frame for im in read_dicom(f, frames=range(2, 5))] == [2, 3, 4]
    last = read_dicom(f, frames=9)[0]
    x = every[9].astype(float)
    lo, hi = np.percentile(x, (0.5, 99.5))
    assert np.array_equal(last.pixels[..., 0], np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))
    assert [im.ref.frame for im in volume_slices(read_dicom(f, frames="all"), 4)] == [0, 3, 6, 9]
    assert [im.ref.frame for im in read_volume(f, 4)] == [0, 3, 6, 9]
    with pytest.raises(MedcError, match="frame 10 is out of range"):
        read_dicom(f, frames=10)


def ct_series(folder, n=5, size=(8, 8), **per):
    folder.mkdir(exist_ok=True)
    for i in range(n):  # file names in reverse of position: the reader sorts by position along the normal
        px = np.full(size, i * 100, np.int16)
        write(folder / f"IM{n - i:04d}", px, RescaleSlope=1, RescaleIntercept=0, InstanceNumber=n - i,
              ImagePositionPatient=[0, 0, 2.5 * i], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
              PixelSpacing=[0.5, 0.5], **per.get(i, {}))
    return folder


def test_series_folder_sorted_and_checked(tmp_path):
    folder = ct_series(tmp_path / "series")
    (folder / "notes.txt").write_text("not dicom")
    images = read_dicom(folder, frames="all")
    # HU 0, 100, 200, 300, 400 by position; B channel (0..80 HU): 0 then 255
    assert [int(im.pixels[0, 0, 1]) for im in images] == [98, 171, 244, 255, 255]
    assert read_dicom(folder)[0].pixels[0, 0, 1] == 244  # the middle slice
    assert len(read_volume(folder, 3)) == 3 and [int(im.pixels[0, 0, 0]) for im in read_volume(folder, 3)] == \
        [128, 152, 177]
    assert all(isinstance(im, DicomImage) and im.pixel_spacing == (0.5, 0.5) for im in images)


def test_series_errors_name_files_not_patients(tmp_path):
    mixed = ct_series(tmp_path / "mixed")
    write(mixed / "IM9999", np.zeros((4, 8), np.int16), ImagePositionPatient=[0, 0, 99],
          ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[0.5, 0.5])
    two = ct_series(tmp_path / "two")
    write(two / "OTHER", np.zeros((8, 8), np.int16), series="9.9.9", ImagePositionPatient=[0, 0, 50],
          ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[0.5, 0.5])
    spacing = ct_series(tmp_path / "spacing", per={2: {}})
    ds = pydicom.dcmread(spacing / "IM0001")
    ds.PixelSpacing = [0.9, 0.9]
    ds.save_as(spacing / "IM0001")
    (tmp_path / "empty").mkdir()
    for folder, match in ((mixed, "mixes image sizes"), (two, "holds 2 series"), (spacing, "another PixelSpacing"),
                          (tmp_path / "empty", "holds no DICOM image files")):
        with pytest.raises(MedcError, match=match) as e:
            read_dicom(folder)
        assert not any(p in str(e.value) for p in PATIENT)


# -- errors -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, match", [
    ("MR_truncated.dcm", "truncated or corrupt"),
    ("no_meta.dcm", "not a DICOM Part 10 file"),
    ("test-SR.dcm", "Comprehensive SR Storage instance, not an image"),
    ("rtplan.dcm", "RT Plan Storage instance, not an image"),
    ("liver.dcm", "Segmentation Storage instance, not an image"),
    ("waveform_ecg.dcm", "Waveform Storage instance, not an image"),
    ("rtdose.dcm", "RT Dose Storage instance, not an image"),
    ("JPEG-lossy.dcm", "cannot be decoded by the installed plugins"),  # a 12-bit JPEG Extended the decoders refuse
])
def test_bad_files(name, match):
    with pytest.raises(MedcError, match=match) as e:
        read_dicom(data(name))
    assert repr(name) in str(e.value) and "/" not in str(e.value).split("'")[1]  # the file name, not its path


def test_missing_plugin_names_it(monkeypatch):
    from pydicom.pixels import get_decoder

    monkeypatch.setattr(get_decoder("1.2.840.10008.1.2.4.90"), "_available", {})
    with pytest.raises(UnsupportedTransferSyntax, match=r"JPEG 2000.*pip install pylibjpeg-openjpeg"):
        read_dicom(data("MR_small_jp2klossless.dcm"))


def test_other_errors(tmp_path):
    nopix = write(tmp_path / "nopix.dcm", np.zeros((4, 4), np.int16))
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    cases = [(nopix, MedcError, "holds no pixel data"), (tmp_path / "gone.dcm", MedcError, "not found")]
    big = write(tmp_path / "big.dcm", np.zeros((2, 2), np.uint8), modality="OT")
    ds = pydicom.dcmread(big)
    ds.Rows, ds.Columns = 9000, 9000  # the header says 81 MP: refused before decoding
    ds.save_as(big)
    cases.append((big, ImageTooLarge, "over medc's limit"))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(write(tmp_path / "whole.dcm", np.zeros((64, 64), np.int16)).read_bytes()[:-1000])
    cases.append((cut, MedcError, "truncated or corrupt"))
    head = tmp_path / "head.dcm"
    head.write_bytes(nopix.read_bytes()[:200])  # cut inside the header: what is left holds no image
    cases.append((head, MedcError, "truncated or corrupt"))
    for f, kind, match in cases:
        with pytest.raises(kind, match=match) as e:
            read_dicom(f)
        assert not any(p in str(e.value) for p in PATIENT)
    with pytest.raises(MedcError, match="not DICOM Part 10 data"):
        read_dicom(b"\0" * 300, name="images[0]")
    assert is_dicom(data("CT_small.dcm")) and is_dicom(Path(data("CT_small.dcm")).read_bytes())
    assert not is_dicom(b"DICM") and not is_dicom(tmp_path / "gone.dcm")
    with open(data("CT_small.dcm"), "rb") as fo:  # a file object
        assert read_dicom(fo)[0].pixels.shape == (128, 128, 3)


# -- the config file --------------------------------------------------------------------------------------------------
def test_dicom_config_toml(tmp_path):
    toml = tmp_path / "site.toml"
    toml.write_text('[CT]\nwindows = [[-1024, 1024], [-160, 240], [0, 80]]\n[mr]\npercentiles = [1, 99]\n'
                    '[default]\nmethod = "minmax"\n')
    cfg = load_config(toml)
    assert cfg.recipe("CT").windows[1] == (-160, 240) and cfg.recipe("MR").percentiles == (1, 99)
    im = read_dicom(data("CT_small.dcm"), cfg)[0]
    assert im.recipe["windows_hu"][1] == [-160, 240] and im.recipe["config"] == "site.toml"
    assert read_dicom(data("JPEG2000.dcm"), cfg)[0].recipe["method"] == "minmax"
    for text, match in (('[CT]\nwindow = 1\n', "unknown keys"), ('[CT]\nmethod = "magic"\n', "unknown"),
                        ('[CT]\nwindows = [[0, 1]]\n', "three windows"), ('[CT\n', "not valid TOML"),
                        ('[MR]\npercentiles = [90, 10]\n', "percentiles")):
        toml.write_text(text)
        with pytest.raises(MedcError, match=match):
            load_config(toml)
    with pytest.raises(MedcError, match="not found"):
        load_config(tmp_path / "none.toml")


# -- everywhere images go ---------------------------------------------------------------------------------------------
def test_run_siglip_with_dcm_and_series(bundle_fp32, tmp_path):
    from click.testing import CliRunner
    from medc.cli import main

    folder = ct_series(tmp_path / "series")
    r = CliRunner().invoke(main, ["run", str(bundle_fp32), "--image", data("CT_small.dcm"), "--image", str(folder),
                                  "--labels", "normal,mass", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)["zero_shot"]
    assert [o["image"] for o in out] == ["CT_small.dcm", "series"]
    assert out[0]["dicom"]["method"] == "ct_windows" and out[0]["dicom"]["windows_hu"][1] == [-135, 215]
    r = CliRunner().invoke(main, ["run", str(bundle_fp32), "--image", data("test-SR.dcm")])
    assert r.exit_code != 0 and "not an image" in r.output and "Traceback" not in r.output


def test_run_medgemma_volume_as_k_images(gemma_fp32, tmp_path):
    import medc.runtime
    from click.testing import CliRunner
    from medc.cli import main
    from medc.runtime.gemma import max_slices

    with medc.runtime.load(gemma_fp32) as m:
        fit = max_slices(m.assets, "Describe", 4)  # the tiny bundle: 512 positions, 16 tokens an image
    folder = ct_series(tmp_path / "series", n=fit + 3)
    args = ["run", str(gemma_fp32), "--prompt", "Describe", "--image", str(folder), "--max-new-tokens", "4", "--json"]
    r = CliRunner().invoke(main, args + ["--slices", "3"])
    assert r.exit_code == 0, r.output
    images = json.loads(r.output.strip().splitlines()[-1])["images"]
    assert len(images) == 3 and images[0]["image"] == "series" and images[0]["dicom"]["modality"] == "CT"
    r = CliRunner().invoke(main, args + ["--slices", str(fit + 1)])
    assert r.exit_code != 0 and f"which holds {fit}" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args)  # the default K: what fits
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["images"]) == fit


def test_server_dicom_data_urls(bundle_fp32, gemma_fp32):
    import httpx

    pytest.importorskip("uvicorn")
    from test_serve import ThreadServer

    s = ThreadServer([bundle_fp32, gemma_fp32], max_images=4, max_image_mb=1.0, max_body_mb=4.0)
    try:
        url = "data:application/dicom;base64," + base64.b64encode(Path(data("CT_small.dcm")).read_bytes()).decode()
        r = httpx.post(s.url + "/v1/embeddings", json={"model": "medsiglip-tiny", "images": [url]})
        assert r.status_code == 200, r.text
        from medc.runtime import load

        with load(bundle_fp32) as m:
            want = m.embed_images([read_dicom(data("CT_small.dcm"))[0]])[0]
        assert np.allclose(r.json()["data"][0]["embedding"], want, atol=1e-5)
        chat = {"model": "medgemma-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe"}]}]}
        assert httpx.post(s.url + "/v1/chat/completions", json=chat).status_code == 200
        sr = "data:application/dicom;base64," + base64.b64encode(Path(data("test-SR.dcm")).read_bytes()).decode()
        err = httpx.post(s.url + "/v1/embeddings", json={"images": [sr]}).json()["error"]
        assert err["code"] == "invalid_image" and "images[0]" in err["message"] and "not an image" in err["message"]
        j2k = "data:application/dicom;base64," + base64.b64encode(
            Path(data("RG1_J2KR.dcm")).read_bytes()).decode()  # ~1.2 MB: over the 1 MiB image limit
        assert httpx.post(s.url + "/v1/embeddings", json={"images": [j2k]}).status_code == 413
    finally:
        s.stop()


def test_calibration_with_dicom_folder(tiny, tmp_path):
    from medc.compile.build import _check_calibration
    from medc.compile.models.siglip import _image_calibration

    folder = ct_series(tmp_path / "calib", n=3)
    _check_calibration(folder)
    feeds, info = _image_calibration(tiny, folder)
    assert info == {"source": "user", "count": 3} and feeds[0]["pixel_values"].shape[1] == 3
    (folder / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    with pytest.raises(MedcError, match="'bad.dcm'.*truncated or corrupt"):
        _check_calibration(folder)


def test_server_decode_uses_its_dicom_config(tmp_path):
    from medc.runtime.serve import ApiError, _decode_dicom

    toml = tmp_path / "site.toml"
    toml.write_text('[CT]\nwindows = [[-1024, 1024], [-160, 240], [0, 80]]\n')
    raw = Path(data("CT_small.dcm")).read_bytes()
    default, site = _decode_dicom(raw, "images[0]"), _decode_dicom(raw, "images[0]", load_config(toml))
    assert np.array_equal(default[..., 0], site[..., 0]) and not np.array_equal(default[..., 1], site[..., 1])
    with pytest.raises(ApiError) as e:
        _decode_dicom(Path(data("rtplan.dcm")).read_bytes(), "images[1]")
    assert e.value.status == 400 and "images[1]" in str(e.value.args)


# -- volumes: the server's slices, the memory plan, no patient data in logs --------------------------------------------
def multiframe_ct(n=10) -> bytes:
    """A multi-frame CT instance made of CT_small.dcm's frame, shifted by 40 HU a frame; patient data set."""
    import io

    ds = pydicom.dcmread(data("CT_small.dcm"))
    frames = np.stack([ds.pixel_array + i * 40 for i in range(n)]).astype(ds.pixel_array.dtype)
    ds.NumberOfFrames, ds.PixelData = n, frames.tobytes()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = PATIENT
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_server_dicom_volume_as_slices(gemma_fp32):
    import httpx

    pytest.importorskip("uvicorn")
    from medc.runtime import load
    from medc.runtime.gemma import encode_prompt
    from test_serve import ThreadServer

    raw = multiframe_ct(10)
    url = "data:application/dicom;base64," + base64.b64encode(raw).decode()
    s = ThreadServer([gemma_fp32], max_images=6, max_image_mb=1.0, max_body_mb=4.0)
    try:
        def chat(**kw):
            return httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
                "model": "medgemma-tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe"}]}], **kw})

        with load(gemma_fp32) as m:
            slices = read_volume(raw, 3)
            want = m.generate("Describe", images=slices, max_new_tokens=4)
            ids3, ids6 = (len(encode_prompt(m.assets, "Describe", k)) for k in (3, 6))
        assert [im.ref.frame for im in slices] == [0, 4, 9]
        r = chat(slices=3)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want  # greedy: the pipeline's tokens on the same slices
        assert r.json()["usage"]["prompt_tokens"] == ids3
        r = chat()  # the default K: what fits; here max_images (6) binds before the 512-token context
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == ids6
        err = chat(slices=7).json()["error"]
        assert err["code"] == "invalid_value" and err["param"] == "slices"
        err = chat(slices=6, max_tokens=400).json()["error"]  # 6 slices and 400 new tokens: over the context
        assert err["code"] == "context_length_exceeded" and err["param"] == "slices" and "which hold" in err["message"]
        assert chat(max_tokens=400).status_code == 200  # the default K shrinks to fit max_tokens
        png = "data:image/png;base64," + base64.b64encode(_png()).decode()
        two = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}},
                                           {"type": "image_url", "image_url": {"url": url}}]}
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [two], "max_tokens": 2, "slices": 6})
        assert r.json()["error"]["code"] == "too_many_images"  # a volume's slices count against max_images
        assert not any(p in r.text for p in PATIENT)
    finally:
        s.stop()


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_memory_plan_bounds_default_slices(gemma_fp32, tmp_path):
    import shutil

    import medc.runtime
    from click.testing import CliRunner
    from medc.cli import main
    from medc.runtime.gemma import max_slices, planned_positions

    copy = tmp_path / "tight"
    shutil.copytree(gemma_fp32, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert "manifest.json" not in manifest["files"] and not (copy / "manifest.sig").exists()
    plan = manifest["build"]["memory_plan"]
    assert planned_positions(plan, manifest["generation"]) == plan["context"]  # a plan that fits bounds nothing
    # the target has half the KV cache's memory the plan counted on: kv(T) = unit x (sum of min(T, keep)) <= kv / 2
    plan["usable_bytes"] = plan["total_bytes"] - plan["kv_bytes"] // 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    keeps = [layer["keep"] for layer in manifest["generation"]["kv_layout"]]
    unit = plan["kv_bytes"] / sum(min(plan["context"], k or plan["context"]) for k in keeps)
    held = lambda t: unit * sum(min(t, k or t) for k in keeps)  # noqa: E731
    tight = planned_positions(plan, manifest["generation"])
    assert held(tight) <= plan["kv_bytes"] // 2 < held(tight + 1) and tight < plan["context"]
    with medc.runtime.load(gemma_fp32) as m:
        wide = max_slices(m.assets, "Describe", 4)
    with medc.runtime.load(copy) as m:
        assert m.assets.memory_positions == tight
        fit = max_slices(m.assets, "Describe", 4)
    assert 1 <= fit < wide
    folder = ct_series(tmp_path / "series", n=wide + 2)
    args = ["run", str(copy), "--prompt", "Describe", "--image", str(folder), "--max-new-tokens", "4", "--json"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output.strip().splitlines()[-1])["images"]) == fit
    r = CliRunner().invoke(main, args + ["--slices", str(fit + 1)])
    assert r.exit_code != 0 and "memory plan" in r.output and f"which holds {fit}" in r.output


def test_run_logs_and_prints_no_patient_data(gemma_fp32, tmp_path):
    import subprocess
    import sys

    folder = ct_series(tmp_path / "series", n=4)
    (tmp_path / "mf.dcm").write_bytes(multiframe_ct(4))
    for image in (folder, tmp_path / "mf.dcm"):
        r = subprocess.run([sys.executable, "-c", "from medc.cli import main; main()", "-vv", "run", str(gemma_fp32),
                            "--prompt", "Describe", "--image", str(image), "--max-new-tokens", "2", "--json"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["images"]
        for p in PATIENT:
            assert p not in r.stdout and p not in r.stderr, p

"""`medc report`: the HTML page from real measurements of the tiny bundles (timed here with ONNX Runtime, not read
from `medc bench`), its figures, the CLI, and (with Chromium) what a browser actually draws.

Speed is never asserted; only that every figure exists, is self-contained and shows something.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from medc.benchmarks import host, plan_check, report, schema
from medc.benchmarks.schema import Floor, Metric, Result, Row
from medc.cli import main
from medc.errors import MedcError

THREADS = 2
# the figure kinds: per model (id fig-<kind>-<model slug>) and, the last two, across models (id fig-<kind>)
KINDS = ("latency", "throughput", "prompt", "past", "floor", "speed-fidelity", "plan")
# what the tiny bundles' rows can show: the encoder has two batch sizes but no prompts; generation has them all
FIGURES = ("latency-medsiglip-tiny", "throughput-medsiglip-tiny", "floor-medsiglip-tiny",
           "latency-medgemma-tiny", "throughput-medgemma-tiny", "prompt-medgemma-tiny", "past-medgemma-tiny",
           "floor-medgemma-tiny", "speed-fidelity", "plan")
HOSTILE = "<script>alert('x')</script> & $HOME"  # must come out escaped, and not break matplotlib (mathtext)


def _memory_floor(metric: str, weights: Path, peak_gbs: float, p50_ms: float) -> Floor:
    """The memory floor of one call: its weights read once at the probed bandwidth."""
    nbytes = weights.stat().st_size
    ms = nbytes / (peak_gbs * 1e9) * 1e3
    return Floor(metric, ms, "memory", nbytes, peak_gbs * 1e9, "probe memory GB/s (max)", ms / p50_ms)


def _encoder_rows(bundle: Path, name: str, peak_gbs: float) -> list[Row]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    onnx = bundle / "image_encoder.onnx"
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    images = np.load(bundle / "golden.npz")["image_encoder/real_images_b3/in/pixel_values"]  # real fundus/IHC
    rows = []
    for batch in (1, 2):
        feeds = {"pixel_values": np.ascontiguousarray(images[:batch])}
        sess.run(None, feeds)
        ms = []
        for _ in range(8):
            t = time.perf_counter()
            sess.run(None, feeds)
            ms.append((time.perf_counter() - t) * 1e3)
        lat = Metric.of("latency_ms", "ms", ms)
        rows.append(Row("encoder", name, "onnxruntime", {"component": "image_encoder", "batch": batch,
                                                         "threads": THREADS},
                        [lat, Metric.of("items_per_s", "items/s", [batch * 1e3 / v for v in ms]),
                         Metric.of("load_s", "s", [load_s])], _memory_floor("latency_ms", onnx, peak_gbs, lat.p50)))
    return rows


def _generation_rows(bundle: Path, name: str, peak_gbs: float) -> list[Row]:
    """TTFT and every inter-token latency of real greedy runs of the tiny MedGemma bundle."""
    import medc.runtime
    from medc.runtime.gemma import encode_prompt

    text = "the chest radiograph shows a small left pleural effusion without pneumothorax " * 30
    rows = []
    with medc.runtime.load(bundle, threads=THREADS) as m:
        m.generate("warm up", max_new_tokens=2, ignore_eos=True)

        def timed(words: int, batch: int, new: int):
            prompt = " ".join(text.split()[:words])
            t0 = last = time.perf_counter()
            stamps = []
            for _ in m.stream([prompt] * batch, max_new_tokens=new, ignore_eos=True):
                now = time.perf_counter()
                stamps.append((now - last) * 1e3)
                last = now
            return len(encode_prompt(m.assets, prompt)), stamps[0], stamps[1:], (last - t0) * 1e3

        for words, batch, past in ((8, 1, False), (40, 1, False), (160, 1, False), (40, 2, False), (40, 1, True),
                                   (160, 1, True)):
            n, ttft, itl, e2e = timed(words, batch, 4 if past else 8)
            tpot = Metric.of("tpot_ms", "ms", itl)
            metrics = [Metric.of("ttft_ms", "ms", [ttft]), tpot,
                       Metric.of("decode_tok_s", "tok/s", [batch * 1e3 / v for v in itl]),
                       Metric.of("prefill_tok_s", "tok/s", [batch * n * 1e3 / ttft]), Metric.of("e2e_ms", "ms", [e2e])]
            params = {"batch": batch, "prompt_tokens": n, "new_tokens": len(itl) + 1, "images": 0,
                      "past": n if past else 0, "threads": THREADS}
            rows.append(Row("generation", name, "onnxruntime", params, metrics,
                            _memory_floor("tpot_ms", bundle / "decoder.onnx", peak_gbs, tpot.p50)))
    return rows


@pytest.fixture(scope="module")
def result(bundle_int8, bundle_fp32, gemma_fp32) -> Result:
    probe = host.Probe(THREADS)
    probe.sample(repeat=2)
    peak_gbs = max(probe.samples["memory"])
    infos, rows = [], []
    for path in (bundle_int8, bundle_fp32, gemma_fp32):
        info = host.bundle_info(path)
        info = dataclasses.replace(info, name=f"{info.model}-{info.precision}")  # the fixtures' folders share names
        infos.append(info)
        rows += (_generation_rows if info.model.startswith("medgemma") else _encoder_rows)(path, info.name, peak_gbs)
    for path, info in ((bundle_int8, infos[0]), (gemma_fp32, infos[2])):  # the planner against a real peak RSS
        plan = plan_check.row(plan_check.measure(path, 512, 4, 1))
        rows.append(dataclasses.replace(plan, bundle=info.name))
    rows[0].notes.append(HOSTILE)
    run = host.run_info(THREADS, ["CPUExecutionProvider"], infos, "tests/test_report.py", probe.metrics())
    res = Result(run, rows, f"tiny bundles on this CPU {HOSTILE}")
    assert schema.validate(json.loads(schema.to_json(res))) == []
    return res


@pytest.fixture(scope="module")
def page_file(result, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    out.write_text(report.render([result]))
    return out


class _Checker(HTMLParser):
    """Tag balance, and every src / href, of an HTML page."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.links, self.errors, self.figures = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href")]
        if tag == "figure":
            self.figures.append(a.get("id"))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_render_has_every_figure_offline(page_file):
    from PIL import Image

    page = page_file.read_text()
    assert page.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(page)
    c.close()
    assert not c.errors and not c.stack, (c.errors, c.stack)
    assert sorted(c.figures) == sorted(f"fig-{f}" for f in FIGURES)
    assert {re.sub(r"-med(siglip|gemma)-tiny$", "", f) for f in FIGURES} == set(KINDS)  # every kind is drawn
    assert page.count(report.FIGURE_TAG) == len(FIGURES) and page.count("<figcaption>") == len(FIGURES)
    # each model's figures sit in its own section, the figures across models after them all
    at = {f: page.index(f'id="fig-{f}"') for f in FIGURES}
    siglip, gemma, across = (page.index(f'id="{s}"') for s in ("model-medsiglip-tiny", "model-medgemma-tiny", "across"))
    assert siglip < max(v for f, v in at.items() if f.endswith("medsiglip-tiny")) < gemma
    assert gemma < min(v for f, v in at.items() if f.endswith("medgemma-tiny")) and across < at["plan"]
    images = [v for v in c.links if not v.startswith("#")]  # the rest: the table of contents' in-page anchors
    assert images and all(v.startswith("data:image/png;base64,") for v in images)
    assert not re.search(r"(src|href)\s*=\s*['\"]?\s*https?://", page) and "<link" not in page
    for v in images:  # every image is a whole PNG
        import base64
        import io

        assert Image.open(io.BytesIO(base64.b64decode(v.split(",", 1)[1]))).size[0] > 100
    # strings from the results are escaped; the environment and one table per model are there
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; $HOME" in page
    for text in ("<h2>medsiglip-tiny</h2>", "<h2>medgemma-tiny</h2>", "medsiglip-tiny-int8", "CPUExecutionProvider",
                 "memory", report.RANDOM_LABEL):
        assert text in page
    # compact tables: the key metrics of each kind, one column per param that varies, no params column
    gen = page[page.index("<h4>generation</h4>"):]
    head = re.search(r"<tr>(.*?)</tr>", gen).group(1)
    for col in ("bundle", "backend", "prompt_tokens", "batch", "past", "ttft_ms (ms)", "tpot_ms (ms)",
                "decode_tok_s (tok/s)", "prefill_tok_s (tok/s)", "of floor"):
        assert f"<th>{col}</th>" in head, head
    assert "<th>params</th>" not in page and "<th>threads</th>" not in page and "every row: " in page


def test_figures_only_with_their_data(result):
    plan_only = Result(result.run, [r for r in result.rows if r.kind == "plan"])
    page = report.render([plan_only], title="plan only")
    assert re.findall(r'id="(fig-[\w-]+)"', page) == ["fig-plan"]
    # nothing to show, no figure: one batch size draws no throughput, one prompt length no prompt plot
    first = next(r.params["prompt_tokens"] for r in result.rows if r.kind == "generation")
    one = Result(result.run, [r for r in result.rows
                              if r.params.get("batch") == 1 and r.params.get("prompt_tokens") in (None, first)])
    ids = re.findall(r'id="fig-([\w-]+)"', report.render([one]))
    assert "latency-medsiglip-tiny" in ids and not [f for f in ids if f.startswith(("throughput", "prompt"))], ids
    # two files on one page: tagged rows, both environments
    page = report.render([result, plan_only])
    assert "#1 tiny bundles" in page and "#2" in page and page.count(report.FIGURE_TAG) == len(FIGURES)


def test_cli_report(result, tmp_path):
    a = tmp_path / "a.json"
    a.write_text(schema.to_json(result))
    out = tmp_path / "sub" / "out.html"
    res = CliRunner().invoke(main, ["report", str(a), "-o", str(out), "--title", "T <1>"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out} ({len(FIGURES)} figures)" in res.output
    assert "<title>T &lt;1&gt;</title>" in out.read_text() and not list(out.parent.glob(".*tmp"))

    for bad, why in (('{"rows": []}', "not a medc benchmark result"),
                     ('{"schema": "medc-bench/1", "run": {}, "rows": []}', "does not match the result schema"),
                     ("not json", "is not JSON")):
        b = tmp_path / "bad.json"
        b.write_text(bad)
        out2 = tmp_path / "out2.html"
        res = CliRunner().invoke(main, ["report", str(a), str(b), "-o", str(out2)])
        assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
        assert why in res.output and "Traceback" not in res.output and not out2.exists()


def test_without_matplotlib_a_clear_error(result, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets where it is not installed
    with pytest.raises(MedcError, match=r"medc report needs matplotlib: pip install 'medc\[report\]'"):
        report.render([result])


PROBE_JS = """<pre id="probe"></pre><script>
window.addEventListener("load", () => {
  const out = [];
  for (const img of document.querySelectorAll("figure.plot img")) {
    const r = {id: img.closest("figure").id, w: img.naturalWidth, h: img.naturalHeight};
    try {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      const colours = new Set();
      let ink = 0;
      for (let i = 0; i < d.length; i += 4) {
        if (d[i] < 245 || d[i + 1] < 245 || d[i + 2] < 245) ink++;
        if (colours.size < 5000) colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
      }
      Object.assign(r, {ink: ink / (c.width * c.height), colours: colours.size});
    } catch (e) { r.error = String(e); }
    out.push(r);
  }
  document.getElementById("probe").textContent = JSON.stringify(out);
});
</script>"""


@pytest.mark.browser
def test_browser_draws_every_figure(page_file, tmp_path):
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs headless Chromium (chromium or chromium-browser on PATH)")
    probed = tmp_path / "probed.html"
    probed.write_text(page_file.read_text().replace("</body>", PROBE_JS + "</body>"))
    base = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert m and m.group(1).strip(), dom.stdout[-2000:]
    figs = json.loads(m.group(1).replace("&quot;", '"'))
    assert sorted(f["id"] for f in figs) == sorted(f"fig-{f}" for f in FIGURES)
    for f in figs:
        assert "error" not in f and f["w"] > 0 and f["h"] > 0, f
        assert f["ink"] > 0.02 and f["colours"] > 3, f

    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1400,6000", page_file.as_uri()],
                   capture_output=True, timeout=60, check=True)
    px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    # not a blank page: text, tables and figures cover a few percent of it whatever the run's numbers (a blank one: 0)
    assert (px.min(1) < 235).mean() > 0.02
    assert (np.abs(px - (31, 119, 180)).max(1) <= 12).sum() > 50  # matplotlib's default blue is drawn

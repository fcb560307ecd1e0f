"""The OpenVINO GenAI baseline (`medc bench --baseline openvino-genai`): the same model, exported by optimum-intel to
a stateful OpenVINO IR (KV cache kept inside the model as state) with NNCF weight compression, and run by
`openvino_genai.LLMPipeline` on the CPU, timed like `hf_generate_timed`.

    source (HF folder | GGUF) ─ ortgenai.hf_folder() ─ optimum-cli export openvino (subprocess)
        ─ ~/.cache/medc/openvino-genai/<key>/ ─ load() ─ generate_timed()

- The export is optimum-intel's own CLI, unchanged: `optimum-cli export openvino --task text-generation-with-past
  --weight-format int4|int8|fp32` (int4: NNCF's data-free 4-bit asymmetric weights, group 128, with the embeddings in
  int8 as its default backup precision; int8: 8-bit per-channel). It also writes the OpenVINO tokenizer/detokenizer.
- optimum-intel 2.2 exports Gemma only under transformers <= 5.0 (its Gemma export config says so, and transformers
  5.25 renamed `past_key_values`). medc itself needs a newer transformers, so the export can run in a side
  environment: MEDC_OPENVINO_EXPORT_PYTHON, else ~/.cache/medc/openvino-genai/export-env/bin/python when it exists,
  else this Python. `EXPORT_ENV` below is the recipe; the error of a failed export names it.
- Running the model needs only openvino-genai in this process. Its CPU defaults are kept as they are (they are what a
  user of the pipeline gets): on a CPU with AMX/AVX512-BF16 the "fp32" IR computes in bf16 (INFERENCE_PRECISION_HINT)
  and the KV cache is stored in u8; `load(..., config)` overrides them (the test asks for f32 to compare with HF).
  One default is changed: prefix caching is off, or every repeat of the same prompt after the first would skip its
  prefill (measured: 512 tokens in 20 ms instead of ~140 ms).
- The built folder is cached by (source sha256, weights, exporter versions, openvino-genai version) and published by
  one rename, so a killed export leaves a `.tmp-*` folder, never a half-built entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medc.errors import MedcError

INSTALL = "--baseline openvino-genai needs openvino-genai: pip install 'medc[baselines]'"
WEIGHTS = ("int4", "int8", "fp32")  # optimum-cli's --weight-format values medc compares against
CACHE = Path.home() / ".cache" / "medc" / "openvino-genai"
EXPORT_ENV = CACHE / "export-env"
EXPORT_RECIPE = (f"python -m venv --system-site-packages {EXPORT_ENV} && {EXPORT_ENV}/bin/pip install "
                 "optimum-intel 'transformers==5.0.0' 'huggingface-hub>=1.3,<1.22' 'tokenizers<0.23'")


def _ovg():
    try:
        import openvino_genai
    except ImportError:
        raise MedcError(INSTALL) from None
    return openvino_genai


require = _ovg  # the install hint, before any build


# -- the exporter -------------------------------------------------------------------------------------------------------
def exporter_python() -> str:
    """The Python that runs optimum-intel's export (see the module docstring)."""
    given = os.environ.get("MEDC_OPENVINO_EXPORT_PYTHON")
    if given:
        return given
    side = EXPORT_ENV / "bin" / "python"
    return str(side) if side.is_file() else sys.executable


def exporter_versions(python: str) -> dict[str, str]:
    """The package versions the export depends on, as the exporter's Python sees them (read from metadata: fast)."""
    code = ("import json, importlib.metadata as m\nout = {}\n"
            "for p in ('optimum-intel', 'optimum', 'transformers', 'nncf', 'openvino', 'openvino-tokenizers', 'torch'):\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: out[p] = None\nprint(json.dumps(out))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise MedcError(f"the OpenVINO exporter Python {python} does not run: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    versions = json.loads(done.stdout)
    if not versions["optimum-intel"]:
        raise MedcError(f"--baseline openvino-genai exports with optimum-intel, which {python} lacks: "
                        f"pip install optimum-intel, or make the export environment: {EXPORT_RECIPE}")
    return versions


# -- build --------------------------------------------------------------------------------------------------------------
def build_model(source: Path, weights: str, cache_dir: Path | None = None,
                log: Callable[[str], Any] = print) -> Path:
    """An OpenVINO GenAI model folder (openvino_model.xml/.bin, tokenizer and detokenizer IRs) for `source`, exported
    once by optimum-intel with `--weight-format weights` and cached."""
    ovg = _ovg()
    from medc.benchmarks.ortgenai import _digest, hf_folder

    source = Path(source)
    if weights not in WEIGHTS:
        raise MedcError(f"openvino-genai baseline weights {weights!r}: use one of {', '.join(WEIGHTS)}.")
    if not source.exists():
        raise MedcError(f"{source} does not exist; pass the checkpoint folder or GGUF file the bundle was built from.")
    python = exporter_python()
    versions = exporter_versions(python)
    key = hashlib.sha256(json.dumps([_digest(source), weights, versions, ovg.__version__]).encode()).hexdigest()[:16]
    out = Path(cache_dir or CACHE) / key
    if (out / "openvino_model.xml").is_file() and (out / "openvino_detokenizer.xml").is_file():
        return out
    tmp = out.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf = hf_folder(source, tmp / "hf", log)
        log(f"openvino-genai: exporting {source.name} ({weights} weights) with optimum-intel "
            f"{versions['optimum-intel']} (transformers {versions['transformers']}, nncf {versions['nncf']})")
        t = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # a local folder: never the hub
        command = [python, "-m", "optimum.commands.optimum_cli", "export", "openvino", "-m", str(hf),
                   "--task", "text-generation-with-past", "--weight-format", weights, str(tmp / "model")]
        # Its progress bars and tracer warnings run to megabytes: keep them out of the bench's output.
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not (tmp / "model" / "openvino_model.xml").is_file():
            lines = [ln for ln in (done.stderr + done.stdout).strip().splitlines() if "Error" in ln] or ["(no error line)"]
            tail = lines[-1][:400]
            if "does not allow for the export" in tail or "cannot import name" in tail or "not a subset" in tail:
                raise MedcError(f"optimum-intel {versions['optimum-intel']} cannot export {source.name} under "
                                f"transformers {versions['transformers']} ({tail}). Make an export environment it "
                                f"supports (medc finds it there): {EXPORT_RECIPE}")
            raise MedcError(f"optimum-intel's OpenVINO export failed on {source.name} ({weights}): {tail}")
        (tmp / "model" / "medc-export.json").write_text(json.dumps(
            {"command": command[1:], "versions": versions, "openvino_genai": ovg.__version__}, indent=1))
        log(f"openvino-genai: exported in {time.perf_counter() - t:.0f} s")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp / "model", out)  # whole or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- run ----------------------------------------------------------------------------------------------------------------
@dataclass
class Handle:
    pipe: Any  # openvino_genai.LLMPipeline
    path: Path
    threads: int | None
    config: dict


def load(model_dir: Path, threads: int | None = None, config: dict | None = None) -> Handle:
    """The exported model in an LLMPipeline on the CPU, `threads` inference threads (None: OpenVINO's default), plus
    any CPU plugin / pipeline properties in `config` (e.g. {"INFERENCE_PRECISION_HINT": "f32"})."""
    ovg = _ovg()
    props = dict(config or {})
    if "scheduler_config" not in props:
        # The pipeline's default CPU path (paged attention under a scheduler) reuses the KV blocks of a prompt prefix
        # it has seen: repeating the bench's fixed prompt would time a one-token prefill. medc and llama.cpp start
        # each timed run from an empty cache, so this one does too.
        scheduler = ovg.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        props["scheduler_config"] = scheduler
    if threads:
        props["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        pipe = ovg.LLMPipeline(str(model_dir), "CPU", **props)
    except RuntimeError as e:
        raise MedcError(f"OpenVINO GenAI cannot load {model_dir}: {str(e).strip().splitlines()[0][:300]}") from None
    return Handle(pipe=pipe, path=Path(model_dir), threads=threads, config=props)


def _streamer(ovg):
    class Stamps(ovg.StreamerBase):
        """Records each token id and when it reached the caller (the pipeline calls `write` once it is chosen)."""

        def __init__(self):
            super().__init__()
            self.stamps: list[float] = []
            self.tokens: list[int] = []

        def write(self, token):
            now = time.perf_counter()
            for t in [token] if isinstance(token, int) else token:
                self.tokens.append(int(t))
                self.stamps.append(now)
            return ovg.StreamingStatus.RUNNING

        def end(self):
            pass

    return Stamps()


def generate_timed(handle: Handle, ids: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    """(t0, per-token timestamps, tokens), as `hf_generate_timed`: t0 before the prompt goes in (as token ids, so no
    chat template or tokenizer of the pipeline's own touches it), a stamp when the streamer receives each new token.
    Greedy, batch 1, exactly `new_tokens` tokens (min_new_tokens = max_new_tokens, ignore_eos)."""
    import numpy as np
    import openvino as ov

    ovg = _ovg()
    config = ovg.GenerationConfig()
    config.max_new_tokens = config.min_new_tokens = int(new_tokens)
    config.ignore_eos, config.do_sample = True, False
    prompt = ov.Tensor(np.asarray([ids], dtype=np.int64))
    streamer = _streamer(ovg)
    t0 = time.perf_counter()
    handle.pipe.generate(prompt, config, streamer)
    if len(streamer.tokens) != new_tokens:
        raise MedcError(f"OpenVINO GenAI streamed {len(streamer.tokens)} tokens where {new_tokens} were asked for.")
    return t0, streamer.stamps, streamer.tokens

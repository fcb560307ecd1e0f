"""The `cuda` target on a real NVIDIA GPU through ONNX Runtime's CUDA provider (skipped without onnxruntime-gpu and a
GPU): the build gates fp16 on the GPU itself, `medc verify` passes there, the components run on CUDA, and MedGemma's
greedy tokens equal Hugging Face generate. The same graphs are gated on the CPU by the other tests;
benchmarks/cuda_check.py records where ONNX Runtime places each node and what a call costs."""

from __future__ import annotations

import pytest

import medc.runtime
from medc.compile.build import BuildOptions, build
from medc.compile.models.siglip import builtin_images
from medc.manifest import Manifest
from medc.runtime.verify import verify_bundle

from test_gemma import PROMPTS, _hf_generate  # tests/ is on sys.path (pytest rootdir-relative imports)

pytestmark = pytest.mark.gpu
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _cuda_build(tmp_path_factory, model: str, precision: str):
    out = tmp_path_factory.mktemp("cuda") / f"{model}-{precision}"
    build(BuildOptions(model=model, target="cuda", precision=precision, out=out))
    return out


def _on_cuda(pipeline) -> dict[str, str]:
    return {name: pipeline.active_providers(name)[0] for name in pipeline.bundle.manifest.components}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_medsiglip_cuda_bundle_runs_and_verifies_on_the_gpu(tmp_path_factory, precision):
    out = _cuda_build(tmp_path_factory, "medsiglip-tiny", precision)
    m = Manifest.read(out)
    assert not any("emulated" in c.quantization.get("gated_on", "") for c in m.components.values())  # gated on GPU
    report = verify_bundle(out, providers=CUDA)
    assert all(r["passed"] for r in report.values()), report
    with medc.runtime.load(out) as pipe:
        assert set(_on_cuda(pipe).values()) == {"CUDAExecutionProvider"}
        emb = pipe.embed_images(builtin_images()[:2])
    assert emb.shape[0] == 2 and abs(float((emb[0] ** 2).sum()) - 1.0) < 1e-3


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_medgemma_cuda_bundle_greedy_equals_hf_on_the_gpu(tmp_path_factory, gemma_tiny, precision):
    """fp32: every token equals HF generate (fp32, CPU). fp16 keeps its fp32 islands; on the tiny random model a
    near-tie may flip late tokens, so it must agree on the first 8 tokens of each prompt and pass its gate on the GPU."""
    out = _cuda_build(tmp_path_factory, "medgemma-tiny", precision)
    report = verify_bundle(out, providers=CUDA)
    assert all(r["passed"] for r in report.values()), report
    with medc.runtime.load(out) as pipe:
        assert _on_cuda(pipe)["decoder"] == "CUDAExecutionProvider"
        for prompts, images in [(PROMPTS[:1], None), (PROMPTS[:1], [builtin_images()[:1]]), (PROMPTS, None)]:
            ours = pipe.generate_ids(prompts, images=images, max_new_tokens=24)
            _, ref = _hf_generate(gemma_tiny.hf_model, pipe.assets, prompts, images, 24)
            if precision == "fp32":
                assert ours == ref
            else:
                assert [o[:8] for o in ours] == [r[:8] for r in ref]

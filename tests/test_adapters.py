"""LoRA adapters merged at build (`medc build MODEL --adapter DIR`): adapters made with peft on the tiny MedGemma
(decoder and vision tower), the tiny MedSigLIP and the real Gemma 3 270M. A merged bundle gives HF + peft's own
answers (the adapter applied, unmerged): identical greedy tokens at fp32, encoder outputs within the cosine gates;
an adapter that does not fit the base, or that is a pickle, is refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft", reason="adapters need the adapters extra: pip install 'medc[adapters]'")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from medc.compile import loader  # noqa: E402
from medc.compile.build import BuildOptions, build  # noqa: E402
from medc.errors import MedcError  # noqa: E402
from medc.manifest import Manifest  # noqa: E402
from medc.runtime import load  # noqa: E402
from medc.runtime.gemma import build_prompt_batch  # noqa: E402

QUESTION = "Is there a pneumothorax?"


def make_adapter(model, folder: Path, targets: list[str], r: int = 4, alpha: float = 16, seed: int = 0,
                 b_scale: float | None = None, **kw) -> Path:
    """A LoRA with random (non-zero) A and B, as training would leave it, saved the way peft saves one."""
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                          **kw))
    if b_scale is not None:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, b_scale)
    pm.save_pretrained(folder)
    pm.unload()  # the base model object back as it was, for the next user
    return folder


def hf_greedy(model, loaded, prompt: str, n: int) -> list[int]:
    batch = build_prompt_batch(loaded.prompt_assets(), [prompt])
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(batch.input_ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=loaded.special_ids["pad"])
    return out[0, batch.input_ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def gemma_adapter(tmp_path_factory) -> Path:
    """On the decoder's attention and MLP and on the vision tower's attention (their names match both)."""
    base = loader.load("medgemma-tiny").hf_model
    return make_adapter(base, tmp_path_factory.mktemp("lora") / "gemma", ["q_proj", "v_proj", "o_proj", "down_proj"])


def test_merged_medgemma_matches_hf_with_peft(gemma_adapter, gemma_fp32, tmp_path, real_images):
    out = tmp_path / "adapted"
    build(BuildOptions(model="medgemma-tiny", out=out, adapters=(gemma_adapter,)))
    m = Manifest.read(out)
    (record,) = m.model["source"]["adapters"]
    assert record["rank"] == 4 and record["alpha"] == 16 and record["scale"] == 1.0 and len(record["sha256"]) == 64
    assert set(record["target_modules"]) == {"q_proj", "v_proj", "o_proj", "down_proj"}
    assert all(c.fidelity["passed"] for c in m.components.values())

    loaded = loader.load("medgemma-tiny")
    peft_model = PeftModel.from_pretrained(loaded.hf_model, str(gemma_adapter)).eval()
    want = hf_greedy(peft_model, loaded, QUESTION, 12)
    with load(out) as adapted, load(gemma_fp32) as base:
        got = adapted.generate_ids([QUESTION], max_new_tokens=12, ignore_eos=True)[0]
        assert got == want  # greedy tokens identical at fp32
        assert got != base.generate_ids([QUESTION], max_new_tokens=12, ignore_eos=True)[0]  # and the adapter acts
        px = adapted.preprocess([real_images[0]])
        vision = adapted.encode_images(px)
        assert not np.allclose(vision, base.encode_images(px), atol=1e-3)  # the vision tower's adapter too
    with torch.no_grad():
        ref = peft_model.base_model.model.get_image_features(pixel_values=torch.from_numpy(px))
        ref = (ref.pooler_output if hasattr(ref, "pooler_output") else ref)
        ref = ref.reshape(vision.shape).numpy()
    np.testing.assert_allclose(vision, ref, atol=1e-4)


def test_merged_medsiglip_matches_hf_with_peft(tmp_path, real_images):
    base = loader.load("medsiglip-tiny")
    adapter = make_adapter(base.hf_model, tmp_path / "siglip", ["q_proj", "v_proj", "fc1"], seed=1)
    out = tmp_path / "adapted"
    build(BuildOptions(model="medsiglip-tiny", out=out, adapters=(adapter,), adapter_scale=0.5))
    assert Manifest.read(out).model["source"]["adapters"][0]["scale"] == 0.5
    loaded = loader.load("medsiglip-tiny")
    peft_model = PeftModel.from_pretrained(loaded.hf_model, str(adapter)).eval()
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", 0.5)
    texts = ["a chest radiograph", "a retinal fundus photograph"]
    with load(out) as adapted:
        px = adapted.preprocess(real_images)
        images, words = adapted.embed_images(real_images), adapted.embed_texts(texts)
        ids = adapted.tokenizer(texts)
    hf = peft_model.base_model.model
    with torch.no_grad():
        ref_images = hf.get_image_features(pixel_values=torch.from_numpy(px))
        ref_texts = hf.get_text_features(input_ids=torch.from_numpy(ids))
    ref_images = getattr(ref_images, "pooler_output", ref_images)
    ref_texts = getattr(ref_texts, "pooler_output", ref_texts)
    norm = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()  # noqa: E731
    np.testing.assert_allclose(images, norm(ref_images), atol=1e-5)
    np.testing.assert_allclose(words, norm(ref_texts), atol=1e-5)


def test_adapter_that_does_not_fit_is_refused(tmp_path, gemma_adapter):
    from safetensors.numpy import load_file, save_file

    from medc.compile import adapters

    model = loader.load("medgemma-tiny").hf_model
    tensors = load_file(str(gemma_adapter / "adapter_model.safetensors"))
    config = json.loads((gemma_adapter / "adapter_config.json").read_text())

    def variant(name: str, change) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        t = dict(tensors)
        change(t)
        save_file(t, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight") and "language_model" in k)
    wide = variant("wide", lambda t: t.__setitem__(key, np.zeros((4, 128), np.float32)))
    with pytest.raises(MedcError, match=rf"{key} has shape \[4, 128\], but '.*q_proj' \(Linear\) needs \[4, 64\]"):
        adapters.check_fits(adapters.read(wide), model)
    moved = variant("moved", lambda t: t.__setitem__(key.replace("layers.0", "layers.9"), t.pop(key)))
    with pytest.raises(MedcError, match="adapts 'model.language_model.layers.9.self_attn.q_proj', which the model "
                                        "does not have"):
        adapters.check_fits(adapters.read(moved), model)
    with pytest.raises(MedcError, match="does not fit this model"):  # refused by the build, before any export
        build(BuildOptions(model="medgemma-tiny", out=tmp_path / "out", adapters=(wide,)))
    assert not (tmp_path / "out").exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(config))
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MedcError, match="a pickle, which medc never loads .* Convert it to safetensors with: python"):
        adapters.read(pickled)
    other = tmp_path / "ia3"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    (other / "adapter_model.safetensors").write_bytes((gemma_adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(MedcError, match="is a 'IA3' adapter; medc merges LoRA"):
        adapters.read(other)


def test_int8_base_with_a_merged_adapter_is_gated_against_hf_with_peft(gemma_adapter, tmp_path):
    out = tmp_path / "int8"
    build(BuildOptions(model="medgemma-tiny", out=out, precision="int8", adapters=(gemma_adapter,)))
    m = Manifest.read(out)
    assert m.components["decoder"].precision == "int8" and all(c.fidelity["passed"] for c in m.components.values())


def test_int8_base_with_run_time_adapters_is_gated_per_adapter(decoder_adapters, tmp_path):
    """QLoRA-style: the int8 base keeps its weights, each fp32 adapter beside it is gated against HF + peft."""
    out = tmp_path / "int8-slots"
    build(BuildOptions(model="medgemma-tiny", out=out, precision="int8", adapter_slots=tuple(decoder_adapters)))
    lora = Manifest.read(out).generation["lora"]
    for name, record in lora["adapters"].items():
        assert record["fidelity"]["passed"] and record["fidelity"]["tolerance"]["min_cosine"] == 0.99, name
    with load(out) as m:
        base = m.generate_ids([QUESTION], max_new_tokens=8, ignore_eos=True)[0]
        assert m.generate_ids([QUESTION], max_new_tokens=8, ignore_eos=True, adapter="style0")[0] != base


def test_real_270m_adapter_merged_gives_hf_with_peft_greedy_tokens(gguf_file, tmp_path):
    """A random LoRA on Gemma 3 270M's real weights, strong enough to change greedy tokens: the build's own
    whole-model gate compares the merged bundle to HF + peft (unmerged) on greedy tokens and perplexity. (The
    run-time form against the merged one: the tiny tests below at fp32, benchmarks/lora.py on this model.)"""
    loaded = loader.load(str(gguf_file))
    adapter = make_adapter(loaded.hf_model, tmp_path / "lora270", ["q_proj", "v_proj"], r=8, alpha=16, seed=2,
                           b_scale=0.02)
    out = tmp_path / "adapted"
    build(BuildOptions(model=str(gguf_file), out=out, adapters=(adapter,)))
    gate = Manifest.read(out).build["generation_gate"]
    assert gate["passed"] and gate["greedy_identical"] and abs(gate["perplexity_increase"]) < 1e-4
    peft_model = PeftModel.from_pretrained(loaded.hf_model, str(adapter)).eval()
    prompt = "The capital of France is"
    with load(out) as adapted:
        got = adapted.generate_ids([prompt], max_new_tokens=16, ignore_eos=True)[0]
    assert got == hf_greedy(peft_model, loaded, prompt, 16)
    with peft_model.disable_adapter():
        assert got != hf_greedy(peft_model, loaded, prompt, 16)  # the adapter changed the answer


# -- adapters at run time -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder_adapters(tmp_path_factory) -> list[Path]:
    """Two adapters of the decoder alone (ranks 4 and 8), as a site would train for two report styles."""
    folder = tmp_path_factory.mktemp("rt")
    base = loader.load("medgemma-tiny").hf_model
    lm = r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)"
    return [make_adapter(base, folder / f"style{i}", lm, r=4 * (i + 1), seed=10 + i) for i in range(2)]


@pytest.fixture(scope="module")
def slotted(tmp_path_factory, decoder_adapters) -> Path:
    out = tmp_path_factory.mktemp("slotted") / "bundle"
    build(BuildOptions(model="medgemma-tiny", out=out, adapter_slots=tuple(decoder_adapters)))
    return out


def _merged(adapter: Path, folder: Path) -> list[int]:
    out = folder / f"merged-{adapter.name}"
    build(BuildOptions(model="medgemma-tiny", out=out, adapters=(adapter,)))
    with load(out) as m:
        return m.generate_ids([QUESTION], max_new_tokens=12, ignore_eos=True)[0]


def test_run_time_adapters_match_their_merged_builds(slotted, decoder_adapters, gemma_fp32, tmp_path):
    m = Manifest.read(slotted)
    lora = m.generation["lora"]
    assert lora["rank"] == 8 and set(lora["adapters"]) == {"style0", "style1"} and lora["empty_slots_max_abs"] < 1e-4
    assert len(lora["slots"]) == 4 * 4  # 4 projections x 4 layers
    with load(slotted) as base, load(gemma_fp32) as plain:
        got = {a: base.generate_ids([QUESTION], max_new_tokens=12, ignore_eos=True, adapter=a)[0]
               for a in (None, "style0", "style1", None)}
        assert got[None] == plain.generate_ids([QUESTION], max_new_tokens=12, ignore_eos=True)[0]
        with pytest.raises(MedcError, match="no adapter 'style9'; it has style0, style1"):
            base.generate_ids([QUESTION], max_new_tokens=2, adapter="style9")
    for a in decoder_adapters:
        assert got[a.name] == _merged(a, tmp_path) != got[None]
    size = sum(p.stat().st_size for p in slotted.rglob("*") if p.is_file())
    assert (slotted / "adapters" / "style1.onnx_adapter").stat().st_size < size / 10


def test_adapter_added_to_a_signed_bundle_as_a_record(slotted, decoder_adapters, tmp_path, copy_bundle):
    from click.testing import CliRunner

    from medc.cli import main
    from medc.runtime.bundle import open_bundle, sign_bundle
    from medc.signing import Trust, generate, load_private

    bundle = copy_bundle(slotted)
    key_file, pub_file = generate(tmp_path / "site")
    sign_bundle(bundle, load_private(key_file))
    signed = (bundle / "manifest.sig").read_bytes()
    base = loader.load("medgemma-tiny").hf_model
    third = make_adapter(base, tmp_path / "third", r".*language_model.*\.(q_proj|v_proj)", r=2, seed=30)
    out = CliRunner().invoke(main, ["adapter", "add", str(bundle), str(third), "--name", "dictation",
                                    "--sign-key", str(key_file)])
    assert out.exit_code == 0, out.output
    assert (bundle / "manifest.sig").read_bytes() == signed  # the base's manifest and signature untouched
    assert (bundle / "records" / "adapter-dictation.json").is_file()
    trust = Trust.load([pub_file])
    opened = open_bundle(bundle, trust=trust)  # hashes and signatures, the record's included
    assert "dictation" in opened.manifest.generation["lora"]["adapters"]
    with load(bundle, trust=trust) as m:
        added = m.generate_ids([QUESTION], max_new_tokens=12, ignore_eos=True, adapter="dictation")[0]
    assert added == _merged(third, tmp_path)
    # what does not fit the slots is refused, naming why
    vision = make_adapter(base, tmp_path / "vision", ["q_proj"], seed=31)  # the vision tower's q_proj too
    bad = CliRunner().invoke(main, ["adapter", "add", str(bundle), str(vision)])
    assert bad.exit_code != 0 and "which this bundle has no run-time slot for" in bad.output
    wide = make_adapter(base, tmp_path / "wide", r".*language_model.*\.q_proj", r=16, seed=32)
    bad = CliRunner().invoke(main, ["adapter", "add", str(bundle), str(wide)])
    assert bad.exit_code != 0 and "has rank 16; this bundle's slots hold rank 8 at most" in bad.output
    (bundle / "adapters" / "dictation.onnx_adapter").write_bytes(b"tampered")
    with pytest.raises(MedcError):
        open_bundle(bundle, trust=trust)


def test_server_runs_each_request_with_its_own_adapter(slotted):
    """medc serve: model BASE:ADAPTER picks the adapter per request; requests of different adapters run at once,
    and each gets the tokens its adapter gives alone."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    from test_serve import ThreadServer

    with load(slotted) as m:
        want = {a: m.generate(QUESTION, max_new_tokens=10, ignore_eos=True, adapter=a)
                for a in (None, "style0", "style1")}
    s = ThreadServer([slotted])
    try:
        names = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        assert names == ["medgemma-tiny", "medgemma-tiny:style0", "medgemma-tiny:style1"]

        def ask(adapter):
            model = "medgemma-tiny" + (f":{adapter}" if adapter else "")
            r = httpx.post(s.url + "/v1/chat/completions", timeout=120, json={
                "model": model, "max_tokens": 10, "ignore_eos": True,
                "messages": [{"role": "user", "content": QUESTION}]})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            return adapter, r.json()["choices"][0]["message"]["content"]

        order = [None, "style0", "style1"] * 4
        with ThreadPoolExecutor(12) as pool:
            for adapter, text in pool.map(ask, order):
                assert text == want[adapter], adapter
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
            "model": "medgemma-tiny:nope", "messages": [{"role": "user", "content": QUESTION}]})
        assert r.status_code == 404 and "has no adapter 'nope'" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_dora_merged(tmp_path, real_images):
    """DoRA (weight-decomposed LoRA): peft merges it, the gate compares against it unmerged."""
    base = loader.load("medsiglip-tiny")
    adapter = make_adapter(base.hf_model, tmp_path / "dora", ["q_proj", "v_proj"], seed=3, use_dora=True)
    out = tmp_path / "adapted"
    build(BuildOptions(model="medsiglip-tiny", out=out, adapters=(adapter,)))
    assert Manifest.read(out).model["source"]["adapters"][0]["use_dora"] is True
    loaded = loader.load("medsiglip-tiny")
    peft_model = PeftModel.from_pretrained(loaded.hf_model, str(adapter)).eval()
    with load(out) as adapted:
        px = adapted.preprocess(real_images)
        images = adapted.embed_images(real_images)
    with torch.no_grad():
        ref = peft_model.base_model.model.get_image_features(pixel_values=torch.from_numpy(px))
    ref = getattr(ref, "pooler_output", ref)
    np.testing.assert_allclose(images, (ref / ref.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)

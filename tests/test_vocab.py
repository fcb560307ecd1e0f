"""Vocabulary reduction (medc vocab, medc build --vocab): the list, the reduced lm_head in both decoder forms, the
runtime's id map, and the refusals. The list is made from texts on this machine (the licences Debian ships, GPL-3
held out: the whole-model gate's text) and the built-in prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medc.runtime
from medc.compile import vocab
from medc.compile.models.gemma3 import PROMPTS
from medc.errors import MedcError

LICENSES = Path("/usr/share/common-licenses")
HELD_OUT = "GPL-3"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    if not LICENSES.is_dir():
        pytest.skip("no /usr/share/common-licenses here")
    prompts = tmp_path_factory.mktemp("corpus") / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return [p for p in sorted(LICENSES.iterdir()) if p.is_file() and p.name != HELD_OUT] + [prompts]


@pytest.fixture(scope="module")
def tiny_list(corpus) -> vocab.VocabList:
    return vocab.make(corpus, vocab.tokenizer_file("medgemma-tiny"))


def _with_ids(made: vocab.VocabList, extra) -> vocab.VocabList:
    return vocab.VocabList(tuple(sorted(set(made.ids) | {int(i) for i in extra})), made.tokenizer_digest,
                           made.vocab_size, made.counts, made.corpus)


@pytest.fixture(scope="module")
def full_greedy(gemma_fp32) -> list[list[int]]:
    with medc.runtime.load(gemma_fp32) as m:
        return [m.generate_ids([p], max_new_tokens=8, ignore_eos=True)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def reduced(tmp_path_factory, tiny_list, full_greedy):
    """Both decoder forms built with a list that holds the full model's greedy tokens (so they must be equal)."""
    from medc.compile.build import BuildOptions, build

    tmp = tmp_path_factory.mktemp("reduced")
    vocab.write(_with_ids(tiny_list, [t for g in full_greedy for t in g]), tmp / "vocab.json")
    out = {}
    for form, flavour in (("gqa", "ort"), ("explicit", "portable")):
        out[form] = tmp / form
        build(BuildOptions(model="medgemma-tiny", out=out[form], flavour=flavour, vocab=tmp / "vocab.json"))
    return out


def test_list_from_texts(tiny_list, corpus, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(vocab.tokenizer_file("medgemma-tiny")))
    ids = set(tiny_list.ids)
    assert {tok.token_to_id(t) for t in ("<eos>", "<end_of_turn>", "<bos>", "<pad>", "<start_of_turn>")} <= ids
    assert set(tok.encode(PROMPTS[2], add_special_tokens=False).ids) <= ids
    assert len(ids) < tok.get_vocab_size()  # a reduction, not the whole vocabulary
    vocab.write(tiny_list, tmp_path / "v.json")
    text = (tmp_path / "v.json").read_text()
    assert "pneumothorax" not in text and "GNU" not in text  # ids and digests, no text
    again = vocab.read(tmp_path / "v.json")
    assert again.ids == tiny_list.ids and again.tokenizer_digest == tiny_list.tokenizer_digest


def test_byte_fallback_kept():
    """A byte-fallback tokenizer's <0x00>..<0xFF> are always kept (the real Gemma 3 tokenizer has them)."""
    from tokenizers import Tokenizer, models

    vocab_map = {"<unk>": 0, "<eos>": 1, "a": 2, "b": 3, **{f"<0x{i:02X}>": 4 + i for i in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<eos>", "<unused0>"])
    special, byte = vocab.keep_always(tok)
    assert len(byte) == 256 and 1 in special and tok.token_to_id("<unused0>") not in special


def test_cli_errors(tmp_path, corpus):
    from click.testing import CliRunner

    from medc.cli import main

    res = CliRunner().invoke(main, ["vocab", str(corpus[0]), "-o", str(tmp_path / "v.json")])
    assert res.exit_code != 0 and "--model" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["vocab", str(tmp_path / "nope"), "-o", str(tmp_path / "v.json"), "--model",
                                    "medgemma-tiny"])
    assert res.exit_code != 0 and "does not exist" in res.output
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00binary")
    res = CliRunner().invoke(main, ["vocab", str(tmp_path / "bin"), "-o", str(tmp_path / "v.json"), "--model",
                                    "medgemma-tiny"])
    assert res.exit_code != 0 and "UTF-8" in res.output
    res = CliRunner().invoke(main, ["vocab", str(corpus[0]), "-o", str(tmp_path / "v.json"), "--model",
                                    "medgemma-tiny"])
    assert res.exit_code == 0, res.output
    assert vocab.read(tmp_path / "v.json").ids


@pytest.mark.parametrize("form", ["gqa", "explicit"])
def test_reduced_logits_equal_full_at_kept_ids(reduced, gemma_fp32, gemma_portable, form):
    """The reduced graph's logits are the full graph's at the kept ids (fp32, same golden inputs)."""
    import onnxruntime as ort

    full_bundle = gemma_fp32 if form == "gqa" else gemma_portable
    ids = np.asarray(json.loads((reduced[form] / "vocab.json").read_text())["ids"])
    golden = np.load(reduced[form] / "golden.npz")
    cases = sorted({k.split("/")[1] for k in golden if k.startswith("decoder/")})
    assert cases
    small = ort.InferenceSession(str(reduced[form] / "decoder.onnx"), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(full_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    for case in cases:
        feeds = {k.split("/")[-1]: v for k, v in golden.items() if k.startswith(f"decoder/{case}/in/")}
        a = small.run(["logits"], feeds)[0]
        b = full.run(["logits"], feeds)[0]
        assert a.shape[-1] == len(ids) and b.shape[-1] > len(ids)
        np.testing.assert_allclose(a, b[..., ids], rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["gqa", "explicit"])
def test_reduced_generation_maps_ids_back(reduced, full_greedy, form):
    with medc.runtime.load(reduced[form]) as m:
        assert m.vocab is not None and len(m.vocab.ids) < 384
        ours = [m.generate_ids([p], max_new_tokens=8, ignore_eos=True)[0] for p in PROMPTS]
        assert ours == full_greedy  # real token ids, as the full model's
        sampled = m.generate_ids([PROMPTS[0]], max_new_tokens=16, temperature=1.0, seed=3, ignore_eos=True)[0]
        assert set(sampled) <= set(m.vocab.ids.tolist())


def test_manifest_and_hash(reduced, tiny_list, copy_bundle):
    from medc.manifest import Manifest

    m = Manifest.read(reduced["gqa"])
    rec = m.generation["vocab"]
    assert rec["reduced"] and rec["file"] == "vocab.json" and rec["size"] >= len(tiny_list.ids)
    assert rec["tokenizer_digest"] == tiny_list.tokenizer_digest and len(rec["list_sha256"]) == 64
    assert "vocab.json" in m.files
    assert m.components["decoder"].outputs[0].shape[-1] == rec["size"]
    assert m.generation["vocab_size"] == 384  # the embedding table stays whole
    bad = copy_bundle(reduced["gqa"])
    ids = json.loads((bad / "vocab.json").read_text())
    ids["ids"][1], ids["ids"][2] = ids["ids"][2], ids["ids"][1]
    (bad / "vocab.json").write_text(json.dumps(ids))
    with pytest.raises(MedcError, match="vocab.json"):
        medc.runtime.load(bad)


def test_build_refuses_another_tokenizers_list(tmp_path, corpus, tiny_list):
    from medc.compile.build import BuildOptions, build

    d = json.loads(vocab.tokenizer_file("medgemma-tiny").read_text())
    a, b = "▁the", "▁of"
    d["model"]["vocab"][a], d["model"]["vocab"][b] = d["model"]["vocab"][b], d["model"]["vocab"][a]
    (tmp_path / "other.json").write_text(json.dumps(d))
    other = vocab.make(corpus[:1], tmp_path / "other.json")
    assert other.tokenizer_digest != tiny_list.tokenizer_digest
    vocab.write(other, tmp_path / "other-list.json")
    out = tmp_path / "b"
    with pytest.raises(MedcError, match="another tokenizer"):
        build(BuildOptions(model="medgemma-tiny", out=out, vocab=tmp_path / "other-list.json"))
    assert not out.exists()
    no_eos = vocab.VocabList(tuple(i for i in tiny_list.ids if i != 1), tiny_list.tokenizer_digest,
                             tiny_list.vocab_size, tiny_list.counts, tiny_list.corpus)
    vocab.write(no_eos, tmp_path / "no-eos.json")
    with pytest.raises(MedcError, match="stop tokens"):
        build(BuildOptions(model="medgemma-tiny", out=out, vocab=tmp_path / "no-eos.json"))
    edited = json.loads((tmp_path / "no-eos.json").read_text())
    edited["ids"].append(383)
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(MedcError, match="digest"):
        build(BuildOptions(model="medgemma-tiny", out=out, vocab=tmp_path / "edited.json"))
    with pytest.raises(MedcError, match="no decoder"):
        build(BuildOptions(model="medsiglip-tiny", out=out, vocab=tmp_path / "other-list.json"))
    assert not out.exists()


def test_plan_counts_the_reduced_lm_head():
    """The planner sizes the lm_head a --vocab build stores: its kept rows only (fp32: 4 bytes x hidden per row)."""
    import dataclasses
    from pathlib import Path

    from medc.compile import planner
    from medc.compile.plan import BuildOptions, plan_for
    from medc.compile.registry import MODELS

    plan = plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x")))
    full, reduced = planner.plan_build(plan), planner.plan_build(dataclasses.replace(plan, lm_head_rows=4041))
    t = MODELS["medgemma-4b-it"].config["text_config"]
    decoder = [next(c.weight_bytes for c in p.components if c.name == "decoder") for p in (full, reduced)]
    assert decoder[0] - decoder[1] == (t["vocab_size"] - 4041) * t["hidden_size"] * 4


def test_reduced_lm_head_is_not_shared_on_gpu_targets(tmp_path, tiny_list):
    """A TensorRT target shares the int8 lm_head's rows with embed_tokens; a reduced lm_head has fewer rows than the
    table, so a --vocab build stores the table on its own, and the planner counts it."""
    from medc.compile import embedding, planner
    from medc.compile.build import BuildOptions, build
    from medc.compile.registry import MODELS
    from medc.manifest import Manifest
    from medc.targets import get_target

    vocab.write(tiny_list, tmp_path / "vocab.json")
    out = tmp_path / "b"
    build(BuildOptions(model="medgemma-tiny", out=out, target="jetson-orin-nano-8gb", precision="int8",
                       vocab=tmp_path / "vocab.json"))
    manifest = Manifest.read(out)
    assert manifest.components["embed_tokens"].quantization["format"] == embedding.PORTABLE_FORM
    assert "lm_head_rows" not in manifest.components["decoder"].quantization
    assert manifest.build["generation_gate"]["passed"] and "shares" not in manifest.components["embed_tokens"].quantization
    recipe = {"embed_tokens": "int8", "decoder": "int8", "lm_head": "int8"}

    def embed_bytes(options):
        plan = planner.plan_memory("medgemma-tiny", "gemma3", MODELS["medgemma-tiny"].config, recipe,
                                   get_target("jetson-orin-nano-8gb"), 512, 1, "portable", options)
        return next(c.weight_bytes for c in plan.components if c.name == "embed_tokens")

    assert embed_bytes({}) == 0 and embed_bytes({"lm_head_rows": len(tiny_list.ids)}) > 0

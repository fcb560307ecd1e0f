"""The registry: explicit entries, real architecture configs, a tiny model whose every parameter is random."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from medc.compile import loader
from medc.compile.hf import hf_class, hf_config
from medc.compile.plan import BuildOptions, plan_for
from medc.compile.registry import MODELS

# Each registered model and the tests that cover it ("module::test"). The guards below fail when a model is added
# without tests, or when a test named here is renamed or removed.
TESTED = {
    "medsiglip-448": ["test_registry::test_medsiglip_448_architecture",
                      "test_bad_input::test_registry_model_without_weights",
                      "test_registry::test_text_encoder_skips_only_discarded_work"],
    "medsiglip-tiny": ["test_parity::test_component_parity", "test_bundle::test_bundle_contents",
                       "test_bad_input::test_build_from_checkpoint_dir"],
    "medgemma-4b-it": ["test_gemma::test_real_configs", "test_registry::test_dry_run_plan",
                       "test_planner::test_recommends_int4_for_medgemma_on_orin_nano_and_refuses_what_cannot_fit"],
    "medgemma-4b-pt": ["test_registry::test_dry_run_plan", "test_gemma::test_real_configs"],  # no chat template
    "medgemma-1.5-4b-it": ["test_registry::test_dry_run_plan"],
    "medgemma-27b-text-it": ["test_gemma::test_real_configs", "test_gemma::test_27b_attention_shapes_on_a_2_layer_model"],
    "medgemma-tiny": ["test_gemma::test_decoder_matches_hf_prefill_and_cached_decode",
                      "test_gemma::test_greedy_equals_hf_generate", "test_gemma::test_streaming_sampling_and_stop",
                      "test_gemma::test_bad_generation_input"],
}


def test_every_registered_model_has_a_test():
    assert set(MODELS) <= set(TESTED), f"registered models without tests: {set(MODELS) - set(TESTED)}"


def test_the_tests_it_names_exist():
    for model, tests in TESTED.items():
        for entry in tests:
            module, name = entry.split("::")
            assert callable(getattr(importlib.import_module(module), name, None)), f"{model}: {entry} does not exist"


def test_medsiglip_448_architecture():
    """Real MedSigLIP-448 shapes, from the registry config, without allocating weights (meta device)."""
    spec = MODELS["medsiglip-448"]
    with torch.device("meta"):
        model = hf_class(spec.family)(hf_config(spec.family, spec.config))
    n_vision = sum(p.numel() for p in model.vision_model.parameters())
    n_text = sum(p.numel() for p in model.text_model.parameters())
    assert 0.40e9 < n_vision < 0.43e9 and 0.43e9 < n_text < 0.46e9  # ~878M together (FACTS.md)
    comps = {c.name: c for c in spec.family.components(model.config)}
    img, txt = comps["image_encoder"], comps["text_encoder"]
    assert img.inputs[0].shape == ("batch", 3, 448, 448) and img.outputs[0].shape == ("batch", 1152)
    assert txt.inputs[0].shape == ("batch", 64) and txt.inputs[0].dtype == "int64"
    assert txt.outputs[0].shape == ("batch", 1152)
    cfg = model.config.vision_config
    assert (cfg.image_size // cfg.patch_size) ** 2 == 1024 and cfg.num_hidden_layers == 27


def test_tiny_every_parameter_randomised(tiny):
    for name, p in tiny.hf_model.named_parameters():
        values = p.detach().numpy().ravel()
        assert np.count_nonzero(values) == values.size, f"{name} has zeros"
        if "norm" in name and name.endswith("weight"):
            assert np.abs(values - 1).max() > 0.01, f"{name} left at 1"
        assert values.std() > 0 or values.size == 1, f"{name} is constant"


def test_tiny_is_deterministic(tiny):
    again = loader.build_random(MODELS["medsiglip-tiny"])
    for (n, a), (_, b) in zip(tiny.hf_model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_tiny_outputs_depend_on_input(tiny):
    comps = {c.name: c for c in tiny.family.components(tiny.hf_model.config)}
    rng = np.random.default_rng(0)
    for comp in comps.values():
        module = comp.extract(tiny.hf_model)
        a, b = comp.dummy_inputs(tiny, 2, rng), comp.dummy_inputs(tiny, 2, rng)
        with torch.no_grad():
            oa = module(*(torch.from_numpy(a[t.name]) for t in comp.inputs)).numpy()
            ob = module(*(torch.from_numpy(b[t.name]) for t in comp.inputs)).numpy()
        cos = (oa * ob).sum(1)  # unit vectors
        assert np.all(cos < 0.99), f"{comp.name}: outputs barely change with the input (cos {cos})"
        assert np.allclose(np.linalg.norm(oa, axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dry_run_plan(name):
    plan = plan_for(BuildOptions(model=name, out="x", precision="int8", random_weights=True))
    spec = MODELS[name]
    comps = spec.family.components(hf_config(spec.family, spec.config))
    assert [c.name for c in plan.components] == [c.name for c in comps]
    for c, p in zip(comps, plan.components):
        if "int8" not in c.precisions:
            assert p.precision == "fp32" and any(c.name in n for n in plan.notes)
        elif c.static_int8:  # encoders: calibrated Q/DQ and dynamic int8 both built, the faster passing one kept
            assert p.methods == ["int8-static-qdq", "int8-dynamic"]
        elif c.name == "embed_tokens":  # block-quantised rows (compile/embedding.py)
            assert p.methods == ["embedding"] and p.embedding.precision == "int8"
        else:  # decoders: weight-only int8 (activation outliers)
            assert p.methods == ["weight-only"] and p.weight_only.lm_head == "int8"
    assert "fidelity gate" in plan.render()
    if name == "medgemma-4b-pt":
        assert spec.chat_template is None


def test_text_encoder_skips_only_discarded_work():
    """The exported text encoder runs its last layer for the pooled (last) position only; on MedSigLIP-448's text
    shapes (2 of its 27 layers, random weights) it gives HF's embedding for random token ids."""
    spec = MODELS["medsiglip-448"]
    cfg = dict(spec.config, text_config={**spec.config["text_config"], "num_hidden_layers": 2})
    cfg["vision_config"] = {**spec.config["vision_config"], "num_hidden_layers": 1}
    torch.manual_seed(0)
    model = hf_class(spec.family)(hf_config(spec.family, cfg)).eval()
    loader.randomize_(model, seed=0)
    comp = {c.name: c for c in spec.family.components(model.config)}["text_encoder"]
    assert comp.reference_extract is not None and comp.reference_extract is not comp.extract
    ids = torch.from_numpy(np.random.default_rng(0).integers(2, cfg["text_config"]["vocab_size"], (3, 64)))
    with torch.no_grad():
        ours, hf = comp.extract(model)(ids), comp.reference_module(model)(ids)
        hf_direct = model.get_text_features(input_ids=ids)
    hf_direct = getattr(hf_direct, "pooler_output", hf_direct)
    assert ours.shape == (3, 1152)
    assert torch.allclose(hf, hf_direct / hf_direct.norm(dim=-1, keepdim=True), atol=1e-6)
    assert (ours - hf).abs().max().item() < 1e-5
    assert torch.nn.functional.cosine_similarity(ours, hf).min().item() > 0.999999

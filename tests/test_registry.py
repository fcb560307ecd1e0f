"""The registry: explicit entries, real architecture configs, a tiny model whose every parameter is random."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medc.compile import loader
from medc.compile.registry import MODELS

# Each registered model and the tests that cover it. The guard below fails when a model is added without tests.
TESTED = {
    "medsiglip-448": "test_medsiglip_448_architecture, test_registry_model_without_weights (test_bad_input)",
    "medsiglip-tiny": "every test that builds a bundle",
}


def test_every_registered_model_has_a_test():
    assert set(MODELS) <= set(TESTED), f"registered models without tests: {set(MODELS) - set(TESTED)}"


def test_medsiglip_448_architecture():
    """Real MedSigLIP-448 shapes, from the registry config, without allocating weights (meta device)."""
    spec = MODELS["medsiglip-448"]
    with torch.device("meta"):
        model = loader._hf_class(spec.family)(loader._config_from_dict(spec.family, spec.config))
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
    from medc.compile.build import BuildOptions, plan_only

    plan = plan_only(BuildOptions(model=name, out="x", precision="int8", random_weights=True))
    assert [c.name for c in plan.components] == ["image_encoder", "text_encoder"]
    assert all(c.methods == ["int8-static-qdq", "int8-dynamic"] for c in plan.components)
    assert "fidelity gate" in plan.render()

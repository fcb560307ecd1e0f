"""The Hugging Face side of a family: its transformers class and config, and models built without weights.

transformers, torch and accelerate are imported inside the functions: they are the heavy build-time backends, and
planning (`medc plan`, `medc build --dry-run`) must not need torch.
"""

from __future__ import annotations

from medc.compile.spec import Family


def hf_class(family: Family):
    """The transformers class of a family (e.g. `SiglipModel`)."""
    import transformers

    return getattr(transformers, family.hf_class)


def hf_config(family: Family, config: dict):
    """A config.json dict as the transformers config object of its model type."""
    from transformers import AutoConfig

    cfg = dict(config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def parameter_bytes(family: Family, config: dict) -> int:
    """fp32 bytes of a model's parameters (tied ones once), from its config alone (meta device, nothing allocated)."""
    import accelerate

    with accelerate.init_empty_weights(include_buffers=True):
        model = hf_class(family)(hf_config(family, config))
    model.tie_weights()
    return 4 * sum(p.numel() for p in model.parameters())


def empty_model(family: Family, config: dict):
    """The HF model with every parameter on untouched CPU storage (no values, no resident pages) and real buffers:
    what a streamed build (compile/stream.py) fills one weight at a time.

    Meta parameters are not enough: the exporter then mixes meta and CPU devices in the decoder and vision graphs.
    """
    import accelerate
    import torch

    with accelerate.init_empty_weights(include_buffers=False):
        model = hf_class(family)(hf_config(family, config))
    model.tie_weights()  # under init_empty_weights HF leaves lm_head untied
    fresh = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in fresh:  # tied parameters stay one object
                    fresh[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                module._parameters[name] = fresh[id(p)]
    return model.eval()

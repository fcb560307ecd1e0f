"""The Gemma 3 family (MedGemma 4B, MedGemma 27B text, Gemma 3 GGUF files): its two decoder forms, the bundle's
tokenizer and generation assets, and the whole-model gate on real weights.

Decoder forms (`FORMS`, recorded as the manifest's `generation.attention`; the runtime picks its decoder by it):
- "explicit" (gemma3.py): attention spelled out in standard ONNX ops, the KV cache passed step to step. Portable:
  TensorRT, the CUDA provider, and fp16 graphs (whose fp32 islands medc.compile.fp16 places).
- "gqa" (gemma3_gqa.py): ONNX Runtime's GroupQueryAttention with KV slots updated in place, for CPU targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from medc.compile.cache import cache_dir, intact, publish
from medc.compile.gates import hf_logits_fn
from medc.compile.models import gemma3, gemma3_gqa
from medc.compile.spec import DecoderForm, DecoderSettings, Family, builtin_data
from medc.errors import MedcError
from medc.manifest import sha256_file
from medc.runtime import evaluate
from medc.runtime.gemma import build_prompt_batch

log = logging.getLogger(__name__)


FORMS: dict[str, DecoderForm] = {
    "explicit": DecoderForm("explicit", components=lambda config, context: gemma3.components(config),
                            kv_positions=gemma3.kv_positions, generation=lambda tcfg, context: {}),
    "gqa": DecoderForm("gqa", components=gemma3_gqa.components_for, kv_positions=gemma3_gqa.kv_positions,
                       generation=gemma3_gqa.generation, context_bytes=gemma3_gqa.rotary_table_bytes, rescores=True,
                       note="GroupQueryAttention with in-place KV slots"),
}


def components(config, decoder: DecoderSettings | None = None):
    """vision_encoder (multimodal models), embed_tokens and the decoder in `decoder`'s form (default: explicit)."""
    decoder = decoder or DecoderSettings("explicit", gemma3.default_context(config))
    return FORMS[decoder.form].components(config, decoder.context)


# -- bundle assets -----------------------------------------------------------------------------------------------------
def write_assets(loaded, out: Path, decoder: DecoderSettings | None = None) -> dict:
    decoder = decoder or DecoderSettings("explicit", gemma3.default_context(loaded.config))
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(loaded.tokenizer_file, out / "tokenizer" / "tokenizer.json")
    tcfg = gemma3.text_config(loaded.config)
    sections = {
        "tokenizer": {"kind": "tokenizers", "file": "tokenizer/tokenizer.json",
                      "chat_template": loaded.chat_template, "special_ids": loaded.special_ids,
                      "special_tokens": loaded.special_tokens, "eos_token_ids": loaded.eos_token_ids,
                      "placeholder": loaded.source["kind"] == "random"},
        "generation": {"kv_layout": gemma3.kv_layout(tcfg), "sliding_window": tcfg.sliding_window,
                       "num_layers": tcfg.num_hidden_layers, "num_kv_heads": tcfg.num_key_value_heads,
                       "head_dim": tcfg.head_dim, "vocab_size": tcfg.vocab_size,
                       "max_positions": tcfg.max_position_embeddings, "attention": decoder.form},
    }
    sections["generation"].update(FORMS[decoder.form].generation(tcfg, decoder.context))
    if loaded.preprocessor_config:
        (out / "preprocessor_config.json").write_text(json.dumps(loaded.preprocessor_config, indent=2) + "\n")
        sections["preprocessing"] = {"image": loaded.preprocessing.to_json(),
                                     "mm_tokens_per_image": loaded.config.mm_tokens_per_image}
    return sections


def extras(model) -> dict:
    return {}


# Gemma 3's instruction-tuned chat template (roles user/model; images as <start_of_image> slots). Real checkpoints
# bring their own (tokenizer_config.json or chat_template.jinja); this one serves the built-in tiny model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = (messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text']) + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_SPECIAL_TOKENS = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "boi": "<start_of_image>", "eoi": "<end_of_image>",
                   "image": "<image_soft_token>", "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>"}


def prepare(loaded, checkpoint: Path | None) -> None:
    """Tokenizer, chat template and special ids, from the checkpoint or the spec's built-in tokenizer."""
    from tokenizers import Tokenizer

    if checkpoint is None:
        loaded.tokenizer_file = builtin_data(loaded.spec.builtin_tokenizer)
        loaded.chat_template = loaded.spec.chat_template
        eos_config = None
    else:
        loaded.tokenizer_file = checkpoint / "tokenizer.json"
        loaded.chat_template = _checkpoint_chat_template(checkpoint)
        gen = checkpoint / "generation_config.json"
        eos_config = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
    tok = Tokenizer.from_file(str(loaded.tokenizer_file))
    ids = {k: tok.token_to_id(v) for k, v in _SPECIAL_TOKENS.items()}
    missing = [v for k, v in _SPECIAL_TOKENS.items() if ids[k] is None and (k not in ("boi", "eoi", "image")
                                                                            or loaded.preprocessor_config)]
    if missing:
        raise MedcError(f"tokenizer {loaded.tokenizer_file} lacks Gemma's special tokens {', '.join(missing)}; "
                        "is this a Gemma 3 checkpoint?")
    loaded.special_ids = {k: v for k, v in ids.items() if v is not None}
    loaded.special_tokens = {k: _SPECIAL_TOKENS[k] for k in loaded.special_ids}
    eos = eos_config if eos_config is not None else [ids["eos"], ids["end_of_turn"]]
    loaded.eos_token_ids = sorted(set(eos if isinstance(eos, list) else [eos]))


def _checkpoint_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            template = json.loads(f.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None  # a base model: plain completion


# -- whole-model gate on real weights -----------------------------------------------------------------------------------
GATE_PROMPTS = ["The patient presented to the emergency department with", "Pneumonia is an infection of the",
                "The most common causes of chest pain include"]
GATE_NEW_TOKENS = 64
GATE_WINDOWS = 8
GATE_WINDOW = 512  # tokens per perplexity window ([BOS] included)
GATE_TOP_K = 32  # reference log-probs kept per position for the KL / top-1 statistics
# Allowed perplexity increase over the fp32 reference, by the decoder's precision (fp32: tokens must be identical).
PPL_GATE = {"fp32": 0.0, "fp16": 0.005, "int8": 0.005, "int4": 0.015}
FP32_NOISE = 1e-4  # a reduced-vocabulary fp32 bundle vs the same model in PyTorch: summation order only
PRECISION_RANK = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3}


TEACHER_FORCED = "teacher-forced logits (random weights: greedy text is fragile at near-ties)"
# What a real-weights reference must hold for gate_check (a cached one without them is computed again).
GATE_FIELDS = {"applied", "greedy", "windows", "perplexity", "text"}


def gate_reference(loaded) -> dict:
    """HF fp32 greedy tokens and perplexity (real weights only; tiny/random weights are gated on logits)."""
    import torch

    if loaded.source["kind"] != "checkpoint":
        return {"applied": TEACHER_FORCED}
    cached = _reference_cache(loaded)
    if cached is not None and intact(cached.parent):
        reference = json.loads(cached.read_text(), object_hook=_unjson)
        lacks = sorted(GATE_FIELDS - set(reference)) or (
            [] if "target_logprobs" in reference["perplexity"] else ["per-token log-probabilities"])
        if not lacks:
            return reference
        log.warning("gate reference %s lacks %s; computing it again", cached.parent.name, ", ".join(lacks))
    assets = loaded.prompt_assets()
    model = loaded.hf_model
    greedy = []
    with torch.no_grad():
        for prompt in GATE_PROMPTS:
            batch = build_prompt_batch(assets, [prompt])
            out = model.generate(input_ids=torch.from_numpy(batch.input_ids), max_new_tokens=GATE_NEW_TOKENS,
                                 min_new_tokens=GATE_NEW_TOKENS, do_sample=False,
                                 pad_token_id=loaded.special_ids["pad"])
            greedy.append(out[0, batch.input_ids.shape[1]:].tolist())
        text_path = evaluate.default_text()
        wins = evaluate.windows(assets.tokenizer, loaded.special_ids["bos"], text_path.read_text(), GATE_WINDOW,
                                GATE_WINDOWS)
        ppl = evaluate.perplexity(hf_logits_fn(model), wins, keep_top=GATE_TOP_K)
    reference = {"applied": "greedy tokens + perplexity vs HF fp32 (real weights)", "greedy": greedy, "windows": wins,
                 "perplexity": ppl, "text": {"name": text_path.name, "sha256": sha256_file(text_path)}}
    if cached is not None:
        tmp = cached.parent.with_name(f"{cached.parent.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / cached.name).write_text(json.dumps(reference, default=lambda a: {"__array__": a.tolist(),
                                                                               "dtype": str(a.dtype)}))
        publish(tmp, cached.parent)
    return reference


def _reference_cache(loaded) -> Path | None:
    """Where the HF reference of an identified source file (a GGUF's sha256) is kept between builds: it is a pure
    function of the weights, the gate settings and the transformers version, and costs minutes on big models."""
    from importlib import metadata

    digest = loaded.source.get("sha256")
    if not digest:
        return None
    adapters = loaded.source.get("adapters")
    if adapters:  # the reference is of the base with its adapters applied: another model
        digest = hashlib.sha256(json.dumps([digest, adapters], sort_keys=True).encode()).hexdigest()
    key = (f"{digest[:16]}-{metadata.version('transformers')}-{GATE_NEW_TOKENS}-{GATE_WINDOWS}-{len(GATE_PROMPTS)}"
           f"-top{GATE_TOP_K}")
    return cache_dir() / "gate-reference" / key / "reference.json"


def _unjson(d: dict):
    return np.asarray(d["__array__"], d.get("dtype", "int64")) if "__array__" in d else d


def gate_check(pipeline, reference: dict, precisions: dict) -> dict:
    """Run the finished bundle through the runtime: greedy tokens and perplexity against the HF reference."""
    if reference.get("applied") == TEACHER_FORCED:  # tiny/random weights: gated per component on logits
        return {"applied": reference["applied"], "passed": True}
    if not GATE_FIELDS <= set(reference):
        raise MedcError(f"the whole-model gate reference lacks {', '.join(sorted(GATE_FIELDS - set(reference)))}; "
                        "this is a medc bug, please report it. Nothing was written.")
    ours = [pipeline.generate_ids([p], max_new_tokens=GATE_NEW_TOKENS, ignore_eos=True)[0] for p in GATE_PROMPTS]
    agree = [int(np.sum(np.cumprod(np.array(a[:len(r)]) == np.array(r[:len(a)])))) for a, r in
             zip(ours, reference["greedy"])]
    # The gate of the least precise of the decoder and its lm_head.
    precision = max((precisions["decoder"], precisions.get("lm_head", precisions["decoder"])), key=PRECISION_RANK.get)
    identical = all(a == len(r) for a, r in zip(agree, reference["greedy"]))
    if getattr(pipeline, "vocab", None) is not None:  # a reduced lm_head: gated on the in-list tokens
        return _reduced_gate(pipeline, reference, precision, agree, identical)
    ppl = evaluate.perplexity(evaluate.bundle_logits_fn(pipeline), reference["windows"],
                              reference_top=reference["perplexity"]["top"])
    ref_ppl = reference["perplexity"]["perplexity"]
    increase = ppl["perplexity"] / ref_ppl - 1
    passed = identical if precision == "fp32" else increase <= PPL_GATE[precision]
    return {
        "applied": reference["applied"], "text": reference["text"],
        "greedy_prefix_agreement": agree, "greedy_new_tokens": GATE_NEW_TOKENS, "greedy_identical": identical,
        "perplexity": ppl["perplexity"], "reference_perplexity": ref_ppl, "perplexity_increase": increase,
        "windows": ppl["windows"], "window": ppl["window"], "kl_mean": ppl["kl_mean"], "kl_p99": ppl["kl_p99"],
        "top1_agreement": ppl["top1_agreement"], "kl_positions": ppl["kl_positions"], "gated_precision": precision,
        "rule": "greedy tokens identical" if precision == "fp32" else
        f"perplexity <= +{PPL_GATE[precision]:.1%} of fp32", "passed": bool(passed),
    }


def _reduced_gate(pipeline, reference: dict, precision: str, agree: list[int], identical: bool) -> dict:
    """A reduced-vocabulary bundle against the full-vocabulary reference renormalised over its list
    (runtime/vocabmap.py `gate_figures`): the precision's perplexity limit on the in-list tokens, fp32 too within
    summation-order noise (tokens outside the list cannot be generated, so greedy identity is reported, not
    required); the out-of-list rate is reported, not gated."""
    from medc.runtime.vocabmap import gate_figures

    figures = gate_figures(pipeline, pipeline.vocab, reference)
    # Where greedy agreement can reach: the reference's tokens up to its first one outside the list.
    figures["greedy_reference_in_list"] = [int(np.cumprod(np.isin(r, pipeline.vocab.ids)).sum())
                                           for r in reference["greedy"]]
    limit = max(PPL_GATE[precision], FP32_NOISE)
    passed = figures["perplexity_increase"] <= limit
    return {
        "applied": reference["applied"] + ", reduced vocabulary vs the full one", "text": reference["text"],
        "greedy_prefix_agreement": agree, "greedy_new_tokens": GATE_NEW_TOKENS, "greedy_identical": identical,
        "perplexity": figures["perplexity"], "reference_perplexity": figures["reference_perplexity"],
        "perplexity_increase": figures["perplexity_increase"], "top1_agreement": figures["top1_agreement"],
        "vocab": figures, "gated_precision": precision,
        "rule": f"in-list perplexity <= +{limit:.2%} of the fp32 model's renormalised over the list "
                "(out-of-list rate reported, not gated)", "passed": bool(passed),
    }


GEMMA3 = Family(
    name="gemma3", hf_class="Gemma3ForConditionalGeneration", model_types=("gemma3",), components=components,
    load_assets=write_assets, extras=extras, required_files=("tokenizer.json", "preprocessor_config.json"),
    prepare=prepare, gate_reference=gate_reference, gate_check=gate_check, forms=FORMS,
    default_context=gemma3.default_context, gate_min_context=GATE_WINDOW,
)
GEMMA3_TEXT = Family(
    name="gemma3", hf_class="Gemma3ForCausalLM", model_types=("gemma3_text",), components=components,
    load_assets=write_assets, extras=extras, required_files=("tokenizer.json",), prepare=prepare,
    gate_reference=gate_reference, gate_check=gate_check, forms=FORMS, default_context=gemma3.default_context,
    gate_min_context=GATE_WINDOW,
)

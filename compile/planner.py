"""`medc plan`: will MODEL at a precision fit TARGET, and how fast can it be at best?

Everything is arithmetic on the model's config (no weights, no torch): parameter shapes per component, bytes per
parameter for the precision *as medc builds it* (block scales and zero points included, so the numbers match the
bundle on disk), the KV cache as the bundle lays it out (Gemma 3's sliding layers keep `window - 1` past tokens, or
a window-sized slot buffer in the ORT flavour's GroupQueryAttention decoder; global layers keep everything), an
activation estimate for the graphs medc exports (eager attention: the score matrices are materialised; the decoder
one prefill chunk's, `prefill_chunk`), the load-time peak, the tokenizer and the runtime's fixed cost. Against the target's usable memory that gives fits / does not fit, and
against its bandwidth and peak throughput the two floors every deployment question starts from:

- decode tokens/s ceiling = bandwidth / bytes read per token (all decoder weights + the KV cache in use);
- vision-encoder ms floor = FLOPs per image / peak FLOP/s at the encoder's precision.

The weight and KV numbers are checked against real bundles in tests/test_planner.py; the activation estimate against
measured peak RSS of CPU runs (benchmarks/plan_check.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from medc.compile.plan import (DEFAULT_RESCORE, BuildOptions, Plan, ResolvedModel, attention_form, gpu_activations,
                                make_plan, tied)
from medc.compile import embedding
from medc.compile.recipes import PRESETS, plan_only
from medc.compile.registry import FAMILIES
from medc.compile.spec import DecoderForm
from medc.errors import MedcError
from medc.runtime.decoder import PREFILL_CHUNK
from medc.targets import Target, get_target

# Fixed memory besides weights, KV, activations and the tokenizer, by platform: host (measured on the CPU runs,
# benchmarks/results/plan-check-270m.md): Python + numpy + onnxruntime and its sessions; jetson (inferred): the same
# process plus CUDA/cuBLAS/TensorRT libraries and the CUDA context, all in the shared LPDDR; datacenter (inferred):
# CUDA context + TensorRT/cuBLAS workspaces in device memory.
RUNTIME_OVERHEAD_GIB = {"host": 0.07, "jetson": 1.02, "datacenter": 0.6}
# The tokenizer in the same process (Hugging Face tokenizers: vocabulary and merges as hash maps) holds about this
# much per vocabulary entry (measured: benchmarks/results/plan-check-270m.md). Counted where the process's memory is
# the planned memory (host RAM, Jetson's shared LPDDR), not a discrete GPU's.
TOKENIZER_BYTES_PER_TOKEN = 1160
TOKENIZER_PLATFORMS = ("host", "jetson")
# ONNX Runtime's CPU MatMulNBits (accuracy level 4) pre-packs its quantised weights into MLAS's int8 layout and keeps
# the initializer too: a session holds 1 + ORT_NBITS_PREPACK times the graph's MatMulNBits bytes (benchmarks/results/design-measurements.md).
ORT_NBITS_PREPACK = 0.64
# The portable form's int8 weights (per-channel DequantizeLinear + MatMul) on ONNX Runtime's CPU provider: it fuses
# them into 8-bit MatMulNBits (blocks of 32, fp32 scales) and pre-packs those, so a session holds 1 + this times the
# stored int8 bytes (measured: benchmarks/results/plan-check-270m.md). Portable int4 (blocked DequantizeLinear) is
# fused into 4-bit MatMulNBits the same way and taken as ORT_NBITS_PREPACK (not measured).
ORT_QDQ_INT8_HELD = 1.25
# ORT's CPU arena and TensorRT's per-context activation memory are held per graph, not shared between graphs:
# the activation estimate sums the components' peaks (but a vision encoder's that releases its arena after each run:
# MemoryPlan.activation_bytes).
GIB = 2**30

# Weight-only and Q/DQ storage as medc writes it (compile/quantize.py): bytes per parameter of a quantised matrix.
# ORT flavour: MatMulNBits, int8 symmetric blocks of 16 (fp32 scale per block), int4 asymmetric blocks of 32 (fp32
# scale and a uint4 zero point per block); an int4 lm_head adds its int8 rescoring rows. Portable flavour: int8 per output channel, int4
# symmetric blocks of 32 (fp32 scales, packed int4). Encoders at int8: Q/DQ per output channel (fp32 scale + int8
# zero point), patch-embedding Conv included (dynamic int8, the CPU's other candidate, leaves some small tensors
# float: the plan sizes the static form). fp16 / bf16 / fp8: plain storage.


def _linear_bytes(precision: str, flavour: str, decoder: bool, k: int, n: int, options: dict) -> float:
    """Bytes of one [k, n] matrix (k = input features) at `precision`."""
    params = k * n
    if precision == "fp32":
        return 4.0 * params
    if precision in ("fp16", "bf16"):
        return 2.0 * params
    if precision == "fp8":
        return params + 4.0 * n
    if precision == "int8":
        if decoder and flavour == "ort":
            block = int(options.get("int8_block_size", 16))
            return params + 4.0 * n * -(-k // block)
        return params + (4.0 if decoder else 5.0) * n  # per-channel scale (+ int8 zero point for encoders)
    if precision == "int4":
        block = int(options.get("int4_block_size", 32))
        blocks = n * -(-k // block)
        zero_points = -(-(-(-k // block)) // 2) * n if (decoder and flavour == "ort") else 0.0  # uint4, per column
        return 0.5 * params + 4.0 * blocks + zero_points
    raise ValueError(precision)


_PLAIN_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 4, "int8": 4, "int4": 4}  # norms, biases: float
_ACT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2, "int8": 4, "int4": 4}  # activations (int8 dequantises)


@dataclass(frozen=True)
class Tensor:
    component: str
    part: str  # the recipe key whose precision applies: a component name or "lm_head"
    shape: tuple[int, ...]
    linear: bool  # a weight matrix the precision quantises (else: float norms, biases, embeddings tables)
    projection: str = ""  # decoder projection name (q_proj, ..., down_proj) for int4_projections


def _siglip_tower(comp: str, c: dict, tokens: int, head: bool, patch: int | None) -> list[Tensor]:
    h, f = c["hidden_size"], c["intermediate_size"]
    out = []
    if patch:  # vision: patch embedding (a Conv; static Q/DQ quantises it per channel) + its bias
        out += [Tensor(comp, comp, (3 * patch * patch, h), True), Tensor(comp, comp, (h,), False)]
    out.append(Tensor(comp, comp, (tokens, h), False))
    for _ in range(c["num_hidden_layers"]):
        out += [Tensor(comp, comp, (h, h), True) for _ in range(4)] + [Tensor(comp, comp, (4 * h,), False)]
        out += [Tensor(comp, comp, (h, f), True), Tensor(comp, comp, (f, h), True), Tensor(comp, comp, (f + h,), False),
                Tensor(comp, comp, (4 * h,), False)]  # two layer norms
    out.append(Tensor(comp, comp, (2 * h,), False))  # post layer norm
    if head:  # SigLIP's attention-pooling head: its packed in_proj is sliced before the MatMuls, so it stays float
        out += [Tensor(comp, comp, (3 * h * h + 3 * h,), False), Tensor(comp, comp, (h, h), True),
                Tensor(comp, comp, (h, f), True), Tensor(comp, comp, (f, h), True),
                Tensor(comp, comp, (5 * h + f,), False)]  # probe, out_proj/fc biases, layer norm
    return out


def _siglip_tensors(cfg: dict) -> list[Tensor]:
    v, t = cfg["vision_config"], cfg["text_config"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    text = [Tensor("text_encoder", "text_encoder", (t["vocab_size"], t["hidden_size"]), False)]
    text += _siglip_tower("text_encoder", t, t.get("max_position_embeddings", 64), False, None)
    text += [Tensor("text_encoder", "text_encoder", (t["hidden_size"], t.get("projection_size", t["hidden_size"])), True)]
    return _siglip_tower("image_encoder", v, patches, True, v["patch_size"]) + text


def _gemma3_decoder(t: dict) -> list[Tensor]:
    h, f, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    out = [Tensor("embed_tokens", "embed_tokens", (t["vocab_size"], h), False)]
    for _ in range(t["num_hidden_layers"]):
        for name, k, n in (("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                           ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)):
            out.append(Tensor("decoder", "decoder", (k, n), True, name))
        out.append(Tensor("decoder", "decoder", (4 * h + 2 * hd,), False))  # 4 RMSNorms + q/k norms
    out += [Tensor("decoder", "decoder", (h,), False), Tensor("decoder", "lm_head", (h, t["vocab_size"]), True)]
    return out


def _gemma3_tensors(cfg: dict) -> list[Tensor]:
    if "text_config" not in cfg:  # Gemma3ForCausalLM
        return _gemma3_decoder(cfg)
    v, t = cfg["vision_config"], cfg["text_config"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    vision = _siglip_tower("vision_encoder", v, patches, False, v["patch_size"])
    vision += [Tensor("vision_encoder", "vision_encoder", (v["hidden_size"],), False),  # projector RMSNorm
               Tensor("vision_encoder", "vision_encoder", (v["hidden_size"], t["hidden_size"]), True)]
    return vision + _gemma3_decoder(t)


# Model family -> its parameter tensors (shapes from the HF config dict).
TENSORS = {"siglip": _siglip_tensors, "gemma3": _gemma3_tensors}


def _vision_flops(cfg: dict, family: str) -> float | None:
    """Multiply-adds x2 of one image through the vision tower (+ projector): the compute floor's numerator."""
    v = cfg.get("vision_config")
    if v is None:
        return None
    n, h, f = (v["image_size"] // v["patch_size"]) ** 2, v["hidden_size"], v["intermediate_size"]
    per_layer = 2 * n * (4 * h * h + 2 * h * f) + 2 * 2 * n * n * h  # projections + MLP, QK^T and PV
    flops = v["num_hidden_layers"] * per_layer + 2 * n * 3 * v["patch_size"] ** 2 * h
    if family == "gemma3":
        flops += 2 * cfg["mm_tokens_per_image"] * h * cfg["text_config"]["hidden_size"]
    return float(flops)


def _tower_flops(c: dict, tokens: int) -> float:
    """One transformer encoder stack over `tokens` positions: projections + MLP, QK^T and PV (x2: FLOPs)."""
    h, f = c["hidden_size"], c["intermediate_size"]
    return float(c["num_hidden_layers"] * (2 * tokens * (4 * h * h + 2 * h * f) + 2 * 2 * tokens * tokens * h))


def encoder_flops(cfg: dict, family: str, component: str) -> float:
    """FLOPs of one item through an embedding component: an image (SigLIP vision tower, or Gemma 3's tower +
    projector) or a text (SigLIP text tower at its fixed length); the numerator of the encoder's compute floor."""
    if component in ("image_encoder", "vision_encoder"):
        flops = _vision_flops(cfg, family)
        if flops is None:
            raise KeyError(f"{component}: no vision_config in the model config")
        return flops
    if component == "text_encoder":
        t = cfg["text_config"]
        return _tower_flops(t, int(t.get("max_position_embeddings", 64)))
    raise KeyError(f"no FLOP count for component {component!r}")


def prefill_flops(cfg: dict, tokens: int) -> float:
    """FLOPs of a Gemma 3 prefill of `tokens` positions: every decoder projection per token, attention over the
    window each layer sees (sliding layers cap it), and the vocabulary projection for the last position only."""
    t = cfg.get("text_config", cfg)
    h, f, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    hd = t.get("head_dim", h // t["num_attention_heads"])
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    proj = 2 * tokens * layers * (h * q + 2 * h * kv + q * h + 3 * h * f)
    window = int(t.get("sliding_window") or tokens)
    types = t.get("layer_types") or ["full_attention"] * layers
    attn = sum(2 * 2 * tokens * min(tokens, tokens if kind == "full_attention" else window) * q for kind in types)
    return float(proj + attn + 2 * h * t["vocab_size"])


@dataclass
class ComponentBytes:
    name: str
    precision: str
    params: int
    weight_bytes: int
    activation_bytes: int


@dataclass
class MemoryPlan:
    model: str
    target: str
    recipe: dict  # component / part -> precision
    context: int
    batch: int
    components: list[ComponentBytes]
    kv_bytes: int
    kv_bytes_per_token: float  # all layers, before the sliding window caps (what a non-windowed cache would cost)
    runtime_bytes: int
    usable_bytes: int
    decode_tokens_per_s: float | None  # ceiling at batch 1, `context` tokens in the cache
    vision_ms: float | None  # floor per image
    notes: list[str] = field(default_factory=list)
    prefill_chunk: int | None = None  # prompt tokens per decoder step the decoder's activations are sized for
    vision_released: bool = False  # the vision encoder's activations are freed before the decoder runs
    # Loading a graph with its weights inside: ONNX Runtime parses the whole file, then copies the initializers into
    # its own tensors, so a graph's bytes are held twice while it loads. What that adds over weights + KV at the
    # worst moment (0: nothing); the activations come later, so the larger of the two counts.
    load_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(c.weight_bytes for c in self.components)

    @property
    def activation_bytes(self) -> int:
        """Every graph's peak, summed (ONNX Runtime's arenas are per session); a vision encoder that releases its
        arena after each run (runtime/gemma.py) is never live beside the others: the larger of the two then."""
        vision = sum(c.activation_bytes for c in self.components if c.name == "vision_encoder")
        rest = sum(c.activation_bytes for c in self.components if c.name != "vision_encoder")
        return max(vision, rest) if self.vision_released else vision + rest

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + max(self.activation_bytes, self.load_bytes) + self.runtime_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(weight_bytes=self.weight_bytes, activation_bytes=self.activation_bytes,
                 total_bytes=self.total_bytes, fits=self.fits)
        return d

    def render(self) -> str:
        g = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
        lines = [f"medc plan: {self.model} on {self.target}  (context {self.context}, batch {self.batch})",
                 "  recipe: " + ", ".join(f"{k}={v}" for k, v in self.recipe.items())]
        for c in self.components:
            lines.append(f"  {c.name:<15} {c.precision:<5} {c.params / 1e6:9.1f} M params  weights {g(c.weight_bytes)}"
                         f"  activations {g(c.activation_bytes)}")
        lines += [f"  {'KV cache':<21} {g(self.kv_bytes)}  ({self.kv_bytes_per_token / 1024:.0f} KiB/token "
                  "before the sliding-window cap)" if self.kv_bytes else "  KV cache: none",
                  f"  {'runtime':<21} {g(self.runtime_bytes)}"]
        if self.prefill_chunk:
            lines.append(f"  {'prefill chunk':<21} {self.prefill_chunk:7d} tokens per decoder step")
        lines += [f"  {'activations':<21} {g(self.activation_bytes)}"
                  + ("  (vision encoder's released before decoding)" if self.vision_released else ""),
                  *([f"  {'loading':<21} {g(self.load_bytes)}  (a graph held twice while it loads, over weights "
                     "+ KV; counted instead of the activations)"] if self.load_bytes > self.activation_bytes else []),
                  f"  {'total':<21} {g(self.total_bytes)}  of {g(self.usable_bytes).strip()} usable -> "
                  + ("fits" if self.fits else "DOES NOT FIT")]
        if self.decode_tokens_per_s is not None:
            lines.append(f"  decode ceiling        {self.decode_tokens_per_s:7.1f} tokens/s (bandwidth / bytes per token)")
        if self.vision_ms is not None:
            lines.append(f"  vision floor          {self.vision_ms:7.1f} ms/image (FLOPs / peak)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _kv(cfg: dict, context: int, batch: int, kv_dtype_bytes: int, form: DecoderForm) -> tuple[int, float]:
    """(KV cache bytes, bytes per token before the sliding-window cap) of the cache the decoder `form` lays out."""
    t = cfg.get("text_config", cfg)
    if "layer_types" not in t:
        return 0, 0.0
    per_token_layer = 2 * t["num_key_value_heads"] * t["head_dim"] * kv_dtype_bytes * batch
    kept = form.kv_positions(t, context)
    return int(per_token_layer * sum(kept)), per_token_layer * len(kept)


def _rescore_rows(cfg: dict, recipe: dict, options: dict) -> int:
    """An int4 lm_head's int8 copy for rescoring (weight_only.add_rescoring): V x H bytes + an fp32 scale per 32.
    Memory only: a step reads the rows of its top candidates."""
    if recipe.get("lm_head") != "int4" or not int(options.get("lm_head_rescore", DEFAULT_RESCORE)):
        return 0
    t = cfg.get("text_config", cfg)
    v, h = int(options.get("lm_head_rows") or t["vocab_size"]), t["hidden_size"]
    return v * h + v * (h // 32) * 4


def prefill_chunk(cfg: dict, context: int) -> int:
    """Prompt tokens in one decoder step: the runtime's prefill chunk, or one whole image where that is longer (an
    image is never split across steps: runtime/decoder.py `chunk_end`), at most the context."""
    return min(context, max(PREFILL_CHUNK, int(cfg.get("mm_tokens_per_image") or 0)))


def _activations(cfg: dict, comp: str, precision: str, context: int, batch: int, fused: bool) -> int:
    """Peak intermediate memory of one graph run. ONNX Runtime runs medc's attention as exported (eager: the score
    and softmax matrices are both live); TensorRT fuses the MatMul-Softmax-MatMul pattern into flash-style kernels
    (`fused`), which never materialise them."""
    a = _ACT_BYTES[precision]
    scores = 0 if fused else 2
    if comp in ("vision_encoder", "image_encoder"):
        v = cfg["vision_config"]
        n, h, f = (v["image_size"] // v["patch_size"]) ** 2, v["hidden_size"], v["intermediate_size"]
        return int(batch * a * (scores * v["num_attention_heads"] * n * n + 2 * n * f + 6 * n * h))
    if comp == "text_encoder":
        t = cfg["text_config"]
        n = t.get("max_position_embeddings", 64)
        return int(batch * a * (scores * t["num_attention_heads"] * n * n + 2 * n * t["intermediate_size"]
                                + 6 * n * t["hidden_size"]))
    t = cfg.get("text_config", cfg)
    c = prefill_chunk(cfg, context)  # the runtime prefills in chunks: a step embeds and decodes c tokens at most
    if comp == "embed_tokens":
        return int(batch * c * t["hidden_size"] * a)
    # decoder, the last prefill chunk (the widest step: c queries over the whole context): one layer's scores,
    # softmax and mask over c x context, its MLP, a few hidden-state buffers, and one row of logits.
    return int(batch * (a * (scores * t["num_attention_heads"] * c * context + (c * context if scores else 0)
                             + 3 * c * t["intermediate_size"]
                             + 8 * c * t["hidden_size"]) + 4 * t["vocab_size"]))


def _family(name: str):
    return next(f for f in FAMILIES.values() if f.name == name)


def plan_memory(model: str, family: str, cfg: dict, recipe: dict[str, str], target, context: int = 4096,
                batch: int = 1, flavour: str | None = None, options: dict | None = None,
                form: DecoderForm | None = None) -> MemoryPlan:
    """The memory and speed plan of `model` (its HF config dict `cfg`) with `recipe` on `target`. `form`: the
    decoder's graph form (default: the one a build with this flavour and recipe makes for `target`)."""
    flavour = flavour or target.graph_flavour
    options = options or {}
    int4_only = set(options.get("int4_projections", ())) or None
    per: dict[str, list[float]] = {}
    params: dict[str, int] = {}
    decoder_bytes = prepack = 0.0
    rows = options.get("lm_head_rows")  # a reduced vocabulary (--vocab): the lm_head keeps these rows only
    shared = embedding.shares_head(recipe, flavour, target.kind == "gpu", tied(cfg), bool(rows))  # one stored table
    for t in TENSORS[family](cfg):
        if rows and t.part == "lm_head":
            t = dataclasses.replace(t, shape=(t.shape[0], int(rows)))
        prec = recipe.get(t.part, recipe.get(t.component, "fp32"))
        if shared and t.component == "embed_tokens":  # stored once, in the decoder; read a row at a time (mmap)
            per.setdefault(t.component, []).append(0)
            params[t.component] = params.get(t.component, 0) + t.shape[0] * t.shape[1]
            continue
        if t.linear and prec == "int4" and int4_only and t.projection and t.projection not in int4_only:
            prec = "int8"
        n = 1
        for d in t.shape:
            n *= d
        if t.linear and len(t.shape) == 2:
            b = _linear_bytes(prec, flavour, t.component == "decoder", t.shape[0], t.shape[1], options)
        elif t.component == "embed_tokens" and prec in ("int8", "int4"):  # rows as stored + one fp32 scale a block
            b = embedding.stored_bytes(t.shape[0], t.shape[1], prec, int(options.get("embed_block_size",
                                                                                     embedding.DEFAULT_BLOCK)))
        else:
            b = n * (2 if prec in ("fp16", "bf16") and t.component == "embed_tokens" else _PLAIN_BYTES[prec])
        per.setdefault(t.component, []).append(b)
        params[t.component] = params.get(t.component, 0) + n
        if t.component == "decoder":
            decoder_bytes += b
            if t.linear and prec in ("int8", "int4") and target.platform == "host":
                prepack += (ORT_QDQ_INT8_HELD if flavour == "portable" and prec == "int8" else ORT_NBITS_PREPACK) * b
    # fp16 KV: fp16/bf16 decoders, and int4/int8 ones on GPU targets (W4A16 / W8A16, plan.gpu_activations)
    kv_bytes_per = 2 if (recipe.get("decoder") in ("fp16", "bf16")
                         or gpu_activations(target, recipe.get("decoder", "fp32")) == "float16") else 4
    kv, kv_per_token = 0, 0.0
    if "decoder" in per:
        form = form or _family(family).forms[attention_form(flavour, target, recipe.get("decoder", "fp32"))]
        tables = form.context_bytes(cfg.get("text_config", cfg), context)
        per["decoder"].append(tables)
        decoder_bytes += tables  # read every step; the rescoring rows (below) only where a step picks them
        if form.rescores:
            per["decoder"].append(_rescore_rows(cfg, recipe, options))
        kv, kv_per_token = _kv(cfg, context, batch, kv_bytes_per, form)
    comps = [ComponentBytes(name, recipe.get(name, "fp32"), params[name], int(sum(bs)),
                            _activations(cfg, name, "fp16" if name == "decoder" and kv_bytes_per == 2  # W4A16
                                         else recipe.get(name, "fp32"), context, batch,
                                         fused=target.engine == "tensorrt"))
             for name, bs in per.items()]
    notes = []
    decode = None
    if target.bandwidth_gbs and decoder_bytes:
        decode = target.bandwidth_gbs * 1e9 / (decoder_bytes + kv)
    elif decoder_bytes:
        notes.append("no decode ceiling: the host's memory bandwidth is not in the cpu profile (`medc plan --probe` "
                     "measures this host's)")
    vision = None
    flops = _vision_flops(cfg, family)
    vis_prec = recipe.get("vision_encoder", recipe.get("image_encoder"))
    if flops and vis_prec:
        gpu = target.kind == "gpu"
        compute = ({"int4": "int8", "fp32": "fp16", "bf16": "fp16"} if gpu else {"int4": "int8"}).get(vis_prec, vis_prec)
        peak = target.peak_tflops.get(compute) or (None if gpu else target.peak_tflops.get("fp32"))
        if peak:
            vision = flops / (peak * 1e12) * 1e3
            if vis_prec == "fp32" and gpu:
                notes.append("fp32 vision floor uses the fp16 tensor-core peak (TF32 is about half of it)")
    vocab = cfg.get("text_config", cfg).get("vocab_size") if "decoder" in per else None
    tokenizer = TOKENIZER_BYTES_PER_TOKEN * vocab if vocab and target.platform in TOKENIZER_PLATFORMS else 0
    runtime = int(RUNTIME_OVERHEAD_GIB[target.platform] * GIB + prepack + tokenizer)
    if prepack:
        notes.append(f"runtime includes {prepack / GIB:.2f} GiB of ONNX Runtime's pre-packed MatMulNBits weights")
    if tokenizer:
        notes.append(f"runtime includes {tokenizer / GIB:.2f} GiB for the tokenizer ({vocab} entries) in memory")
    chunk = prefill_chunk(cfg, context) if "decoder" in per else None
    # The runtime releases the vision encoder's activations after each run (runtime/gemma.py): ONNX Runtime's arena
    # shrinkage, or a TensorRT context given its memory per run (runtime/trt_session.py, USER_MANAGED).
    released = "vision_encoder" in per and "decoder" in per
    if chunk:
        notes.append(f"decoder activations are one prefill chunk's ({chunk} tokens over the {context}-token "
                     "context): the runtime prefills in chunks")
    # Loading (measured on the host's ONNX Runtime sessions, benchmarks/results/plan-check-270m.md): the pipeline loads
    # embed_tokens and the decoder largest first (runtime/gemma.py), so the larger is held twice with nothing else
    # resident; a vision encoder loads at the first image, beside everything else. What that adds over the weights and
    # KV, if anything. A TensorRT engine is read whole before it is deserialised too, but that is not measured: other
    # platforms plan without it.
    load = 0
    if target.platform == "host" and comps:
        text = [c.weight_bytes for c in comps if c.name != "vision_encoder"]
        late = sum(c.weight_bytes for c in comps if c.name == "vision_encoder")
        load = max(0, 2 * max(text or [0]) - sum(c.weight_bytes for c in comps) - kv, late)
    if load > sum(c.activation_bytes for c in comps):
        notes.append(f"the peak is at load time ({load / GIB:.2f} GiB over the weights and KV, more than the "
                     "activations): ONNX Runtime holds a graph twice while it loads")
    if shared:
        notes.append("embed_tokens reads the int8 lm_head's rows in the decoder's data file (mapped, a row at a "
                     "time): stored and counted once, in the decoder")
    if released:
        notes.append("activations count the larger of the vision encoder's and embed_tokens + decoder's: the vision "
                     "encoder's are released before the decoder runs")
    return MemoryPlan(model, target.name, dict(recipe), context, batch, comps, kv, kv_per_token, runtime,
                      target.usable_bytes(), decode, vision, notes, chunk, released, load)


def default_context(cfg: dict) -> int:
    """4096 tokens (a report with a few images), or the model's own limit when smaller (the tiny models: 512)."""
    t = cfg.get("text_config", cfg)
    return min(4096, int(t.get("max_position_embeddings", 4096))) if "vocab_size" in t else 64


def plan_build(plan: Plan, context: int | None = None, batch: int | None = None,
               target: Target | None = None) -> MemoryPlan:
    """The memory plan of a build's plan: its recipe, flavour, decoder form and target (`target`: that target with
    this host's measured peaks, `with_host_peaks`)."""
    context = context or plan.context or default_context(plan.config)
    options = {**plan.recipe.options, **({"lm_head_rows": plan.lm_head_rows} if plan.lm_head_rows else {})}
    return plan_memory(plan.model, plan.family, plan.config, plan.recipe.precisions, target or get_target(plan.target),
                       context, batch or plan.max_batch, plan.flavour, options, plan.form)


def with_host_peaks(target: Target, flops: dict[str, float], bytes_per_s: float | None) -> Target:
    """A CPU target with this host's measured GEMM peaks (precision -> ops/s) and memory bandwidth (bytes/s), so that
    its plan has a vision floor and a decode ceiling (the cpu profile has neither: any CPU)."""
    if target.kind != "cpu":
        raise MedcError(f"{target.name} is a {target.kind} target with datasheet peaks; a host probe is for CPU "
                        "targets.")
    return dataclasses.replace(target, peak_tflops={k: v / 1e12 for k, v in flops.items()},
                               bandwidth_gbs=bytes_per_s / 1e9 if bytes_per_s else None)


def recommend(model: ResolvedModel, opts: BuildOptions, context: int | None = None,
              batch: int | None = None, target: Target | None = None) -> tuple[MemoryPlan | None, list[MemoryPlan]]:
    """Every preset the target can build, planned; and the fastest that fits (None if none does).

    Fastest: the highest decode ceiling for generative models, else the lowest vision floor, else the fewest bytes."""
    target = target or get_target(opts.target)
    plans = []
    for name in PRESETS:
        if name not in target.precisions or name in plan_only(target):
            continue
        try:
            p = plan_build(make_plan(dataclasses.replace(opts, precision=name, recipe=None), model), context, batch,
                           target)
        except MedcError:
            continue  # a preset this model has no form of on this target
        if all(p.recipe != q.recipe for q in plans):  # int4 on an encoder-only model is its int8
            p.notes.insert(0, f"preset {name}")
            plans.append(p)
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return None, plans
    best = max(fitting, key=lambda p: (p.decode_tokens_per_s or 0, -(p.vision_ms or 0), -p.total_bytes))
    return best, plans


def check_fits(model: ResolvedModel, opts: BuildOptions, plan: Plan | None = None) -> MemoryPlan:
    """Refuse a build for a fixed-memory target that its plan (made from `opts` when not given) says cannot fit;
    say which preset would."""
    plan = plan_build(plan or make_plan(opts, model))
    target = get_target(opts.target)
    if plan.fits or target.usable_memory_gib is None:  # cpu: the deployment host's RAM is not known here
        return plan
    best, _ = recommend(model, opts)
    if best:
        fix = f"--precision {preset_of(best)} fits ({best.total_bytes / GIB:.1f} GiB)"
    else:
        shorter = [(p, largest_context(model, opts, p)) for p in ("int4", "int8") if p in target.precisions]
        fix = "no preset fits at this context" + "".join(f"; {p} fits at --context {c}" for p, c in shorter if c)
        fix += "; or choose a target with more memory"
    raise MedcError(f"{plan.model} with this recipe needs {plan.total_bytes / GIB:.1f} GiB at context {plan.context}, "
                    f"batch {plan.batch}; {target.name} has {plan.usable_bytes / GIB:.1f} GiB usable. {fix}. "
                    "(`medc plan` shows the breakdown.)")


def preset_of(plan: MemoryPlan) -> str:
    """The preset a plan from `recommend` was made with."""
    return next((n.split()[1] for n in plan.notes if n.startswith("preset ")), "custom")


def largest_context(model: ResolvedModel, opts: BuildOptions, precision: str, batch: int | None = None) -> int | None:
    """The largest context (halving from the requested one, down to 256 tokens) at which `precision` fits."""
    plan = make_plan(dataclasses.replace(opts, precision=precision, recipe=None), model)
    context = opts.context or default_context(plan.config)
    while context >= 256:
        if plan_build(plan, context, batch).fits:
            return context
        context //= 2
    return None

"""medc's pipelines as models of NVIDIA Triton Inference Server's Python backend.

`medc export triton` writes, per bundle, a model whose `model.py` is one line naming a class here, and whose version
folder holds the bundle itself (`1/bundle/`, hashes and signature intact). Triton runs each instance in its own
Python stub process; the class loads the bundle there with medc's runtime, which verifies it as `medc run` does.

- `SiglipModel` (MedSigLIP): raw image bytes (PNG, JPEG or DICOM) and texts in; image and text embeddings and the
  zero-shot scores of every image against every text out. Clients need no preprocessing code. The images and texts
  of all the requests Triton hands one `execute` call run through the encoders together.
- `GemmaModel` (MedGemma): a prompt and optional images in, text out, as decoupled (streamed) responses. The whole
  generation runs in-process on medc's continuous-batching scheduler: a per-token loop of BLS calls would copy the
  KV cache between models at every step. Its inputs follow Triton's generate extension (`text_input`,
  `text_output`, `max_tokens`, `stream`), so POST /v2/models/NAME/generate_stream works.

`triton_python_backend_utils` exists only inside Triton's stub process; tests supply a stand-in with its data types.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.runtime import load
from medc.runtime.batch import SamplingParams, Sequence
from medc.runtime.gemma import encode_messages
from medc.runtime.imagelimits import ImageTooLarge
from medc.runtime.preprocess import open_image

log = logging.getLogger("medc.triton")

BUNDLE_DIR = "bundle"  # inside the model's version folder
MAX_IMAGE_BYTES = 64 * 2**20
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_CAP = 4096


def _pb():
    import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend stub

    return pb_utils


def decode_image(data: bytes, what: str):
    """PNG, JPEG or DICOM Part 10 bytes -> an image the bundle's preprocessing takes. Errors name `what`, never the
    content."""
    from PIL import UnidentifiedImageError

    from medc.runtime.dicom import is_dicom, read_dicom

    if len(data) > MAX_IMAGE_BYTES:
        raise MedcError(f"{what} is over the {MAX_IMAGE_BYTES // 2**20} MiB limit.")
    if is_dicom(data):
        return read_dicom(bytes(data), None, frames="middle", name=what)[0].pixels
    try:
        return open_image(io.BytesIO(data), what, formats=["PNG", "JPEG"])
    except ImageTooLarge:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise MedcError(f"{what} is not a readable PNG, JPEG or DICOM image (corrupt, truncated or another "
                        "format).") from None


def _strings(tensor) -> list[str]:
    """A BYTES tensor (numpy object array of bytes) -> its elements as text."""
    out = []
    for item in tensor.as_numpy().reshape(-1):
        out.append(item.decode("utf-8") if isinstance(item, (bytes, bytearray)) else str(item))
    return out


def _scalar(pb, request, name: str, kind, default):
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise MedcError(f"input {name} must hold one value (got {values.size}).")
    return kind(values[0])


class _BundleModel:
    """What both models share: the bundle found in the version folder, loaded on this instance's device."""

    def initialize(self, args: dict) -> None:
        self.pb = _pb()
        self.config = json.loads(args["model_config"])
        if args.get("model_instance_kind") == "GPU":
            # Each instance is its own stub process, so pinning the process to the instance's GPU is safe. Triton's
            # device ids count the GPUs this process sees: keep that meaning under a CUDA_VISIBLE_DEVICES already set.
            device = int(args.get("model_instance_device_id", 0))
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[device] if device < len(visible) else str(device)
        root = Path(args["model_repository"]) / args["model_version"] / BUNDLE_DIR
        self.pipeline = load(root)  # hash-verified, target-checked, signatures per MEDC_TRUSTED_KEYS
        log.info("%s: loaded %s", args.get("model_name", "?"), root)

    def finalize(self) -> None:
        self.pipeline.close()

    def _error(self, e: Exception):
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(str(e)))


class SiglipModel(_BundleModel):
    """Inputs (all optional, BYTES, any count): `image` (PNG/JPEG/DICOM bytes), `text`. Outputs: `image_embeds`
    [images, D], `text_embeds` [texts, D] (L2-normalised float32), `scores` [images, texts] (sigmoid(exp(scale) *
    cos + bias): SigLIP scores each text on its own, not a softmax over them)."""

    def execute(self, requests: list) -> list:
        pb, pipe = self.pb, self.pipeline
        prepared, pixels, texts = [], [], []
        for request in requests:
            try:
                images = pb.get_input_tensor_by_name(request, "image")
                text = pb.get_input_tensor_by_name(request, "text")
                if images is None and text is None:
                    raise MedcError("give `image` (PNG, JPEG or DICOM bytes), `text`, or both.")
                raw = [] if images is None else list(images.as_numpy().reshape(-1))
                px = [pipe.preprocess.one(decode_image(bytes(b), f"image[{i}]")) for i, b in enumerate(raw)]
                words = [] if text is None else _strings(text)
                if any(not w.strip() for w in words):
                    raise MedcError("text must not hold empty strings.")
                prepared.append((len(pixels), len(px), len(texts), len(words)))
                pixels += px
                texts += words
            except MedcError as e:
                prepared.append(e)
        dim = pipe.bundle.manifest.components["image_encoder"].outputs[0].shape[-1]
        image_embeds = (pipe.embed_pixel_values(np.stack(pixels)) if pixels else np.zeros((0, dim), np.float32))
        text_embeds = pipe.embed_texts(texts) if texts else np.zeros((0, dim), np.float32)
        responses = []
        for p in prepared:
            if isinstance(p, Exception):
                responses.append(self._error(p))
                continue
            i0, ni, t0, nt = p
            im, tx = image_embeds[i0:i0 + ni], text_embeds[t0:t0 + nt]
            scores = 1 / (1 + np.exp(-pipe.logits(im, tx))) if ni and nt else np.zeros((ni, nt), np.float32)
            responses.append(pb.InferenceResponse(output_tensors=[
                pb.Tensor("image_embeds", np.ascontiguousarray(im, np.float32)),
                pb.Tensor("text_embeds", np.ascontiguousarray(tx, np.float32)),
                pb.Tensor("scores", np.ascontiguousarray(scores, np.float32))]))
        return responses


class GemmaModel(_BundleModel):
    """Decoupled. Inputs: `text_input` (BYTES [1], the user's message, rendered with the bundle's chat template),
    optional `image` (BYTES, PNG/JPEG/DICOM), `max_tokens` (INT32), `temperature`, `top_p` (FP32), `top_k` (INT32),
    `seed` (INT64), `stream` (BOOL: a response per text delta; otherwise one), `adapter` (BYTES: a run-time LoRA
    adapter of the bundle). Output `text_output` (BYTES [1]).
    Every request ends with a response flagged final (empty when streamed)."""

    def initialize(self, args: dict) -> None:
        from medc.runtime.scheduler import GenerationScheduler

        super().initialize(args)
        params = self.config.get("parameters", {})
        concurrency = int(params.get("max_concurrency", {}).get("string_value", "8"))
        self.scheduler = GenerationScheduler(self.pipeline, args.get("model_name", "medgemma"), concurrency)

    def finalize(self) -> None:
        self.scheduler.close()
        super().finalize()

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                seq = self._sequence(request, sender)
                self.scheduler.submit(seq)
            except Exception as e:  # noqa: BLE001 - every request hears why it failed; the log names the type only
                if not isinstance(e, MedcError):
                    log.error("generation request failed (%s)", type(e).__name__)
                sender.send(self._error(e), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _sequence(self, request, sender) -> Sequence:
        from medc.runtime.textstream import TextStream

        pb, pipe = self.pb, self.pipeline
        prompt = pb.get_input_tensor_by_name(request, "text_input")
        if prompt is None:
            raise MedcError("text_input is required: the prompt as one BYTES element.")
        texts = _strings(prompt)
        if len(texts) != 1 or not texts[0].strip():
            raise MedcError("text_input must hold exactly one non-empty prompt.")
        images = pb.get_input_tensor_by_name(request, "image")
        raw = [] if images is None else list(images.as_numpy().reshape(-1))
        decoded = [decode_image(bytes(b), f"image[{i}]") for i, b in enumerate(raw)]
        content = [{"type": "image"} for _ in decoded] + [{"type": "text", "text": texts[0]}]
        ids = encode_messages(pipe.assets, [{"role": "user", "content": content}])
        max_tokens = _scalar(pb, request, "max_tokens", int, DEFAULT_MAX_TOKENS)
        if not 1 <= max_tokens <= MAX_TOKENS_CAP:
            raise MedcError(f"max_tokens must be in 1..{MAX_TOKENS_CAP} (got {max_tokens}).")
        if len(ids) + max_tokens > pipe.assets.max_positions:
            raise MedcError(f"the prompt's {len(ids)} tokens + max_tokens {max_tokens} exceed this build's context "
                            f"of {pipe.assets.max_positions} tokens; shorten the prompt or lower max_tokens.")
        adapter = pb.get_input_tensor_by_name(request, "adapter")  # a run-time LoRA adapter of the bundle
        adapter = _strings(adapter)[0] if adapter is not None else None
        if adapter is not None and adapter not in pipe.adapters:
            raise MedcError(f"this bundle has no adapter {adapter[:80]!r}; it has {', '.join(pipe.adapters) or 'none'}.")
        params = SamplingParams(max_new_tokens=max_tokens, adapter=adapter,
                                temperature=_scalar(pb, request, "temperature", float, 0.0),
                                top_k=_scalar(pb, request, "top_k", int, 0),
                                top_p=_scalar(pb, request, "top_p", float, 1.0),
                                seed=_scalar(pb, request, "seed", int, None))
        params.validate()
        stream = _scalar(pb, request, "stream", bool, False)
        text = TextStream(pipe.assets.tokenizer)
        pixel_values = pipe.preprocess(decoded) if decoded else None
        out: list[str] = []
        final = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def send(piece: str, flags: int = 0) -> None:
            if stream and piece:
                sender.send(pb.InferenceResponse(output_tensors=[
                    pb.Tensor("text_output", np.array([piece.encode()], dtype=object))]))
            elif piece:
                out.append(piece)
            if flags:
                tensors = [] if stream else [pb.Tensor("text_output", np.array(["".join(out).encode()], dtype=object))]
                sender.send(pb.InferenceResponse(output_tensors=tensors) if tensors else None, flags=flags)

        def emit(kind: str, value) -> None:  # the scheduler's thread
            if kind == "token":
                piece, _ = text.push(value)
                send(piece)
                cancelled = getattr(sender, "is_cancelled", None)
                if cancelled is not None and cancelled():
                    seq.cancel()
            elif kind == "done":
                piece, _ = text.flush()
                send(piece, final)
            else:  # "error": the message names the problem, never the prompt
                sender.send(self._error(MedcError(str(value))), flags=final)

        seq = Sequence(ids, pixel_values, params, emit=emit)
        return seq

"""MedSigLIP at run time: image and text embeddings, zero-shot classification. numpy + onnxruntime only."""

from __future__ import annotations

import numpy as np

from medc.errors import MedcError
from medc.runtime.bundle import Bundle
from medc.runtime.preprocess import ImagePreprocessing
from medc.runtime.session import Pipeline
from medc.runtime.tokenizer import SiglipTokenizer


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SiglipPipeline(Pipeline):
    """`with medc.runtime.load(bundle) as m: m.zero_shot(["cxr.png"], ["pneumothorax", "normal"])`."""

    def __init__(self, bundle: Bundle, threads: int | None = None):
        super().__init__(bundle, threads)
        m = bundle.manifest
        self.preprocess = ImagePreprocessing.from_json(m.preprocessing["image"])
        self.logit_scale = float(m.extras["logit_scale"])
        self.logit_bias = float(m.extras["logit_bias"])
        self._tokenizer = None

    @property
    def tokenizer(self) -> SiglipTokenizer:
        if self._tokenizer is None:
            t = self.bundle.manifest.tokenizer
            self._tokenizer = SiglipTokenizer(self.bundle.file(t["file"]), max_length=int(t["max_length"]),
                                              do_lower_case=bool(t.get("do_lower_case", True)))
        return self._tokenizer

    # -- the API --
    def embed_images(self, images) -> np.ndarray:
        """Paths, PIL images or uint8/uint16 arrays -> L2-normalised float32 [N, D]."""
        images = list(images)
        if not images:
            raise MedcError("no images given.")
        pixel_values = self.preprocess(images)
        return self._sessions["image_encoder"].run({"pixel_values": pixel_values})["image_embeds"]

    def embed_pixel_values(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._sessions["image_encoder"].run({"pixel_values": pixel_values.astype(np.float32)})["image_embeds"]

    def embed_texts(self, texts) -> np.ndarray:
        return self.embed_texts_counted(texts)[0]

    def embed_texts_counted(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """(text embeddings [N, D], token counts [N]): the server's `usage` without tokenizing twice."""
        texts = list(texts)
        if not texts:
            raise MedcError("no texts given.")
        ids, counts = self.tokenizer(texts, lengths=True)
        return self._sessions["text_encoder"].run({"input_ids": ids})["text_embeds"], counts

    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """[N_images, N_texts] = exp(logit_scale) * cos + logit_bias, as HF SiglipModel's logits_per_image."""
        return np.exp(self.logit_scale) * (image_embeds @ text_embeds.T) + self.logit_bias

    def zero_shot(self, images, labels: list[str]) -> np.ndarray:
        """Per image and label, the sigmoid probability that the label applies (SigLIP scores labels independently)."""
        labels = [l for l in labels if l.strip()]
        if not labels:
            raise MedcError("no labels given; pass e.g. --labels 'normal,pneumothorax'.")
        return _sigmoid(self.logits(self.embed_images(images), self.embed_texts(labels)))

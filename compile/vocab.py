"""Vocabulary reduction: the token ids a site's own texts use (`medc vocab`), and a decoder whose lm_head keeps only
those rows (`medc build --vocab FILE`).

Gemma 3's vocabulary is 262k tokens; a site's reports use a small part of it, and the lm_head (hidden x vocab) is
much of a small decoder's bytes and of every decode step. The list holds every id the tokenizer produces on the
corpus, every special token (so EOS / end-of-turn can still end an answer) and every byte-fallback token
(`<0x00>`..`<0xFF>`, so any text still encodes and any byte can still be generated). `<unusedN>` tokens are left
out: no text produces them and they were never trained. The embedding table stays whole: a prompt may hold any token.

The list carries its tokenizer's digest (the token -> id map), so a build with another tokenizer refuses it. It holds
no text: ids, counts and digests only.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from medc.errors import MedcError
from medc.runtime.vocabmap import VOCAB_FILE, VOCAB_FORMAT

log = logging.getLogger(__name__)

_UNUSED = re.compile(r"<unused\d+>")
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class VocabList:
    """A reduced vocabulary: sorted token ids and where they came from (counts and digests, no text)."""

    ids: tuple[int, ...]
    tokenizer_digest: str  # `tokenizer_digest` of the tokenizer that produced the ids
    vocab_size: int  # that tokenizer's, added tokens included
    counts: dict  # ids from the corpus, special tokens, byte-fallback tokens
    corpus: dict  # files, tokens, and a digest of the files' contents

    @property
    def digest(self) -> str:
        """sha256 of the id list itself (the manifest's `source list digest`)."""
        return hashlib.sha256(json.dumps(list(self.ids)).encode()).hexdigest()

    def to_json(self) -> dict:
        return {"format": VOCAB_FORMAT, "tokenizer": {"digest": self.tokenizer_digest, "vocab_size": self.vocab_size},
                "size": len(self.ids), "counts": self.counts, "corpus": self.corpus, "list_sha256": self.digest,
                "ids": list(self.ids)}


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a `tokenizers.Tokenizer`'s token -> id map (added tokens included): what an id means. Two files
    that spell the same tokenizer differently (a GGUF's conversion, the bundle's copy) give the same digest."""
    vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: (kv[1], kv[0]))
    return "sha256:" + hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


# -- the tokenizer of --model ------------------------------------------------------------------------------------------
def tokenizer_file(model: str | None) -> Path:
    """The tokenizer.json of MODEL: a built bundle, a Gemma 3 GGUF file, a checkpoint folder, or a registry name
    (its built-in tokenizer for tiny models, its checkpoint's otherwise)."""
    if not model:
        raise MedcError("medc vocab needs the model's tokenizer: pass --model with the model you will build (a registry "
                        "name, a checkpoint folder or a GGUF file) or a bundle built from it.")
    path = Path(model)
    if (path / "manifest.json").is_file():  # a bundle: its tokenizer section names the file
        from medc.manifest import Manifest

        t = Manifest.read(path).tokenizer
        if not t or t.get("kind") != "tokenizers":
            raise MedcError(f"{model} is a bundle without a Gemma tokenizer; vocabulary reduction is for MedGemma / "
                            "Gemma 3 bundles.")
        return path / t["file"]
    from medc.compile.plan import resolve

    resolved = resolve(model)
    if resolved.family.gate_check is None or not resolved.family.forms:
        raise MedcError(f"{model} has no text decoder: vocabulary reduction is for MedGemma / Gemma 3 models.")
    source = resolved.source
    if source.kind in ("tiny", "random"):
        from medc.compile.spec import builtin_data

        return builtin_data(resolved.spec.builtin_tokenizer)
    if source.path is None:
        raise MedcError(f"the weights of {model} are not on this machine (looked in {', '.join(source.looked)}); "
                        "pass --model with its checkpoint folder, GGUF file, or a bundle built from it.")
    if source.format == "gguf":
        from medc.compile.loader import gguf_tokenizer

        return gguf_tokenizer(source.path) / "tokenizer.json"
    return source.path / "tokenizer.json"


def load_tokenizer(file: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception type
        raise MedcError(f"cannot read the tokenizer {file}: {str(e).splitlines()[0][:200]}") from None


# -- making a list -------------------------------------------------------------------------------------------------------
def corpus_files(paths: list[Path]) -> list[Path]:
    """Text files: each file given, and every file under each folder given (hidden ones skipped), in a fixed order."""
    files = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            raise MedcError(f"corpus path {p} does not exist; pass text files or folders of them.")
    if not files:
        raise MedcError("the corpus holds no files; pass text files (e.g. exported reports) or folders of them.")
    return files


def keep_always(tokenizer) -> tuple[set[int], set[int]]:
    """(special tokens, byte-fallback tokens) every list keeps, whatever its corpus."""
    from medc.compile.models.gemma3_family import _SPECIAL_TOKENS

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
               and not _UNUSED.fullmatch(t.content)}
    special |= {vocab[s] for s in _SPECIAL_TOKENS.values() if s in vocab}
    byte = {i for tok, i in vocab.items() if _BYTE.fullmatch(tok)}
    return special, byte


def make(paths: list[Path], tok_file: Path) -> VocabList:
    """The list of the corpus `paths` under the tokenizer `tok_file`."""
    tokenizer = load_tokenizer(tok_file)
    files, used, tokens = corpus_files(paths), set(), 0
    contents = hashlib.sha256()
    for f in files:
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise MedcError(f"{f} is not UTF-8 text; export the reports as plain text (UTF-8).") from None
        contents.update(hashlib.sha256(data).digest())
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        used.update(ids)
        tokens += len(ids)
    special, byte = keep_always(tokenizer)
    ids = tuple(sorted(used | special | byte))
    log.info("vocabulary: %d ids (%d from %d corpus tokens, %d special, %d byte-fallback) of %d", len(ids), len(used),
             tokens, len(special), len(byte), tokenizer.get_vocab_size(with_added_tokens=True))
    return VocabList(ids, tokenizer_digest(tokenizer), tokenizer.get_vocab_size(with_added_tokens=True),
                     {"corpus": len(used), "special": len(special), "byte_fallback": len(byte)},
                     {"files": len(files), "tokens": tokens, "sha256": contents.hexdigest()})


def write(vocab: VocabList, out: Path) -> None:
    out = Path(out)
    if out.is_dir():
        raise MedcError(f"{out} is a directory; pass a file name for -o (e.g. vocab.json).")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(vocab.to_json()) + "\n")
    tmp.replace(out)


def read(path: Path) -> VocabList:
    """A list written by `medc vocab`, checked for shape (its tokenizer is checked by `check`)."""
    path = Path(path)
    if not path.is_file():
        raise MedcError(f"vocabulary list {path} does not exist; make one with `medc vocab CORPUS -o {path.name} "
                        "--model MODEL`.")
    try:
        d = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise MedcError(f"{path} is not a vocabulary list (not JSON); make one with `medc vocab`.") from None
    if not isinstance(d, dict) or d.get("format") != VOCAB_FORMAT:
        raise MedcError(f"{path} is not a {VOCAB_FORMAT} vocabulary list; make one with `medc vocab`.")
    ids = d.get("ids")
    if (not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids)
            or ids != sorted(set(ids))):
        raise MedcError(f"{path}: its ids are not a sorted list of distinct token ids; make it again with `medc vocab`.")
    if d.get("list_sha256") != hashlib.sha256(json.dumps(ids).encode()).hexdigest():
        raise MedcError(f"{path}: its ids do not match its digest (edited by hand?); make it again with `medc vocab`.")
    t = d.get("tokenizer") or {}
    return VocabList(tuple(ids), str(t.get("digest")), int(t.get("vocab_size", 0)), d.get("counts", {}),
                     d.get("corpus", {}))


def check(vocab: VocabList, source: str, loaded) -> None:
    """Refuse a list made with another tokenizer than the loaded model's, one without its stop tokens, or ids past
    its lm_head."""
    config = loaded.config
    vocab_rows = int((getattr(config, "text_config", None) or config).vocab_size)
    eos_ids = loaded.eos_token_ids or []
    digest = tokenizer_digest(load_tokenizer(loaded.tokenizer_file))
    if digest != vocab.tokenizer_digest:
        raise MedcError(f"the vocabulary list {source} was made with another tokenizer ({vocab.tokenizer_digest[:19]}"
                        f"…) than this model's ({digest[:19]}…); its ids would mean other tokens. Make it again with "
                        "`medc vocab CORPUS -o FILE --model` and the model you build.")
    missing = sorted(set(eos_ids) - set(vocab.ids))
    if missing:
        raise MedcError(f"the vocabulary list {source} lacks the stop tokens {missing}: answers could never end. "
                        "Make it again with `medc vocab` (it keeps every special token).")
    if vocab.ids[-1] >= vocab_rows:
        raise MedcError(f"the vocabulary list {source} holds id {vocab.ids[-1]}, past this model's {vocab_rows} "
                        "lm_head rows; make it again with `medc vocab --model` and the model you build.")


# -- the reduced decoder --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def reduced_head(model, ids: tuple[int, ...]):
    """`model.lm_head` replaced, while the block runs, by a projection onto the rows `ids` only (a copy: Gemma's
    lm_head is tied to the embedding table, which stays whole)."""
    import torch

    full = model.lm_head
    head = torch.nn.Linear(full.in_features, len(ids), bias=full.bias is not None)
    with torch.no_grad():
        index = torch.as_tensor(ids, dtype=torch.long)
        head.weight = torch.nn.Parameter(full.weight.detach().index_select(0, index).clone(), requires_grad=False)
        if full.bias is not None:
            head.bias = torch.nn.Parameter(full.bias.detach().index_select(0, index).clone(), requires_grad=False)
    model.lm_head = head
    try:
        yield head
    finally:
        model.lm_head = full


def _reduced(extract, ids):
    def run(model):
        with reduced_head(model, ids):
            return extract(model)

    return run


def _code_digest(fn) -> str:
    return hashlib.sha256(Path(inspect.getsourcefile(fn)).read_bytes()).hexdigest()[:16]


def reduce_components(comps: dict, vocab: VocabList) -> dict:
    """The components with the decoder's logits over `vocab.ids` only (its lm_head rows); the others unchanged.
    The export cache keys a graph by its extract function's file; the wrapper lives here, so the decoder code's
    digest joins the variant."""
    out = dict(comps)
    for name, comp in comps.items():
        if not comp.parts:
            continue
        logits = tuple(replace(t, shape=(*t.shape[:-1], len(vocab.ids))) if t.name == "logits" else t
                       for t in comp.outputs)
        out[name] = replace(
            comp, outputs=logits, extract=_reduced(comp.extract, vocab.ids),
            reference_extract=_reduced(comp.reference_extract, vocab.ids) if comp.reference_extract else None,
            variant={**comp.variant, "vocab": vocab.digest, "decoder_code": _code_digest(comp.extract)})
    return out


def list_logprobs(model, vocab: VocabList, token_windows) -> list:
    """The full-vocabulary reference renormalised over the list: per window, the HF fp32 model's log-probability of
    each next token under its softmax over the kept ids only (NaN where the token is outside the list). The reduced
    bundle is gated against this, so the gate measures the build's error, not the reduction's own effect."""
    import numpy as np

    from medc.compile.gates import hf_logits_fn
    from medc.runtime.evaluate import logsumexp
    from medc.runtime.vocabmap import VocabMap

    vmap, fn, out = VocabMap(vocab.ids, vocab.vocab_size), hf_logits_fn(model), []
    for row in token_windows:
        logits = np.ascontiguousarray(fn(np.asarray(row))[:-1, vmap.ids])
        index, ok = vmap.index(np.asarray(row[1:]))
        lp = logits[np.arange(len(index)), index] - logsumexp(logits)
        out.append(np.where(ok, lp, np.nan).astype(np.float32))
    return out


def bundle_record(vocab: VocabList, stage: Path) -> dict:
    """Write the id list into the bundle (hashed with every file) and return the manifest's `generation.vocab`."""
    (stage / VOCAB_FILE).write_text(json.dumps({"format": VOCAB_FORMAT, "ids": list(vocab.ids)}) + "\n")
    return {"reduced": True, "file": VOCAB_FILE, "size": len(vocab.ids), "tokenizer_digest": vocab.tokenizer_digest,
            "list_sha256": vocab.digest, "counts": vocab.counts,
            "corpus": {k: vocab.corpus[k] for k in ("files", "tokens", "sha256") if k in vocab.corpus}}

"""Ed25519 signatures over a bundle's manifest and over the records added to a bundle after it was signed.

What a signature covers: the manifest in canonical form (JSON, keys sorted, no insignificant whitespace, UTF-8). The
manifest names every file of the bundle with its sha256, so one signature covers every byte; a record (TensorRT
engines finished on the device) names the manifest it extends by digest and its own files by sha256, and is signed by
the key that made it. A site trusts public keys (`--trust FILE…`, or MEDC_TRUSTED_KEYS); with trust configured, a
bundle or record that is unsigned, or signed by a key outside it, is refused.

Keys are the `cryptography` package's Ed25519 (RFC 8032): a private key in PKCS#8 PEM (mode 0600), a public key in
SubjectPublicKeyInfo PEM, both readable by openssl. A key is named by its id, the first 16 hex digits of the sha256
of its 32 raw public bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from medc.errors import MedcError

TRUST_ENV = "MEDC_TRUSTED_KEYS"  # os.pathsep-separated .pub files or folders of them
SIGNATURE_FORMAT = 1


def canonical(data: dict) -> bytes:
    """The bytes a signature covers: the same JSON value always gives the same bytes, whatever its layout on disk."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(data: dict) -> str:
    return hashlib.sha256(canonical(data)).hexdigest()


def _raw_public(public) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    name: str  # the file it came from, for messages
    key: object  # cryptography's Ed25519PublicKey


@dataclass(frozen=True)
class PrivateKey:
    key_id: str
    name: str
    key: object  # cryptography's Ed25519PrivateKey


def generate(out: Path) -> tuple[Path, Path]:
    """Write OUT.key (private, 0600) and OUT.pub. Refuses to overwrite either."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    key_path, pub_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise MedcError(f"{p} exists; choose another name with -o (a key is never overwritten).")
    if not out.parent.is_dir():
        raise MedcError(f"folder {out.parent} does not exist; create it or choose another -o.")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # O_EXCL and mode 0600 from the start: the private key is never readable by others, not even for a moment.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_private(path: Path) -> PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise MedcError(f"cannot read the signing key {path} ({type(e).__name__}).") from None
    except (ValueError, TypeError):
        raise MedcError(f"{path} is not an unencrypted PEM private key; make one with `medc keygen -o NAME`.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise MedcError(f"{path} is not an Ed25519 key; make one with `medc keygen -o NAME`.")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise MedcError(f"the signing key {path} can be read by other users; `chmod 600 {path}` first.")
    return PrivateKey(key_id(key.public_key()), path.name, key)


def load_public(path: Path) -> PublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as e:
        raise MedcError(f"cannot read the trusted key {path} ({type(e).__name__}).") from None
    except ValueError:
        raise MedcError(f"{path} is not a PEM public key; pass the .pub file `medc keygen` wrote.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise MedcError(f"{path} is not an Ed25519 public key; pass the .pub file `medc keygen` wrote.")
    return PublicKey(key_id(key), path.name, key)


@dataclass(frozen=True)
class Signature:
    """A signature file (`manifest.sig`, `records/NAME.sig`)."""

    signed: str  # what it covers: "manifest" or "record NAME"
    key_id: str
    public_key: str  # base64 of the raw key: names the signer; trust decides whether it counts
    signature: str  # base64
    created: str
    format: int = SIGNATURE_FORMAT
    algorithm: str = "ed25519"

    @classmethod
    def make(cls, payload: bytes, key: PrivateKey, signed: str) -> "Signature":
        return cls(signed=signed, key_id=key.key_id,
                   public_key=base64.b64encode(_raw_public(key.key.public_key())).decode(),
                   signature=base64.b64encode(key.key.sign(payload)).decode(),
                   created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> "Signature | None":
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            sig = cls(**data)
        except (OSError, ValueError, TypeError):
            raise MedcError(f"{path} is not a medc signature file; sign the bundle again (`medc sign`).") from None
        if sig.format != SIGNATURE_FORMAT or sig.algorithm != "ed25519":
            raise MedcError(f"{path}: signature format {sig.format} / {sig.algorithm} is not one this medc reads.")
        return sig


@dataclass(frozen=True)
class Trust:
    """The public keys a site accepts, by key id."""

    keys: dict[str, PublicKey]

    @classmethod
    def load(cls, paths) -> "Trust":
        keys = {}
        for p in map(Path, paths):
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            if p.is_dir() and not files:
                raise MedcError(f"trusted-key folder {p} holds no .pub files.")
            for f in files:
                k = load_public(f)
                keys[k.key_id] = k
        if not keys:
            raise MedcError("no trusted keys given.")
        return cls(keys)

    @classmethod
    def from_env(cls) -> "Trust | None":
        value = os.environ.get(TRUST_ENV, "").strip()
        return cls.load([p for p in value.split(os.pathsep) if p]) if value else None

    def check(self, payload: bytes, sig: Signature | None, what: str, fix: str) -> PublicKey:
        """The trusted key that signed `payload`; a MedcError naming `what` otherwise."""
        from cryptography.exceptions import InvalidSignature

        if sig is None:
            raise MedcError(f"{what} is unsigned, and this site trusts only signed bundles. {fix}")
        key = self.keys.get(sig.key_id)
        if key is None:
            raise MedcError(f"{what} is signed by key {sig.key_id}, which is not among the trusted keys "
                            f"({', '.join(f'{k.name} {i}' for i, k in self.keys.items())}). Add that key's .pub "
                            f"to the trust only if you know who holds it. {fix}")
        try:
            key.key.verify(base64.b64decode(sig.signature, validate=True), payload)
        except (InvalidSignature, ValueError):
            raise MedcError(f"{what} does not match its signature by {key.name} ({sig.key_id}): it was edited after "
                            f"signing. Do not use it; copy the bundle again from its source. {fix}") from None
        return key

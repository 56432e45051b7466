"""Governance's signature (Ed25519): what every other process trusts only when governance vouches
for it — token records, tenants' quotas and policies, site enrollments, ledger blocks.

Governance holds the private key (`governance/signing.key` in the secrets folder, mode 0600); every
service holds the public keys it trusts (`governance.pub`, one key per line: the current one first,
older ones kept after a rotation so what they signed still verifies). A record is sealed as its
JSON plus a `_sig` field, the signature over the canonical JSON of the rest (sorted keys, no
spaces), so any reader re-derives the signed bytes. Storage that anyone but governance can write
(a KV bucket, a stream) can then at most withhold or replay what governance signed, never forge it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cncbrain.errors import CncError, DataLoss

SIG_FIELD = "_sig"
PRIVATE_FILE = Path("governance") / "signing.key"
PUBLIC_FILE = Path("governance.pub")


class SignatureError(DataLoss, ValueError):
    """A record without governance's valid signature (forged or damaged)."""


def canonical(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self.key.sign(data)).decode()

    def seal(self, data: Mapping[str, Any]) -> bytes:
        """`data` as JSON with governance's signature in `_sig`."""
        return json.dumps({**data, SIG_FIELD: self.sign(canonical(data))}, sort_keys=True).encode()

    @property
    def public_text(self) -> str:
        return public_text(self.key.public_key())


class Verifier:
    """The public keys a process trusts governance's signatures from."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self.keys = list(keys)
        if not self.keys:
            raise CncError("no governance public key to verify with")

    def valid(self, data: bytes, signature: str | bytes) -> bool:
        try:
            raw = base64.b64decode(signature, validate=True) if isinstance(signature, str) else signature
        except ValueError:
            return False
        for key in self.keys:
            try:
                key.verify(raw, data)
                return True
            except InvalidSignature:
                continue
        return False

    def unseal(self, raw: bytes | str) -> dict[str, Any]:
        """The record sealed by `Signer.seal`; raises `SignatureError` when it is not governance's."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise SignatureError(f"not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SignatureError("not a JSON object")
        signature = data.pop(SIG_FIELD, None)
        if not isinstance(signature, str):
            raise SignatureError("unsigned")
        if not self.valid(canonical(data), signature):
            raise SignatureError("the signature is not governance's")
        return data


def public_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def ensure_signing_key(folder: Path) -> Signer:
    """Governance's key pair in the secrets folder `folder`, created when missing (kept otherwise)."""
    from cncbrain.bus.credentials import write_private

    private = Path(folder) / PRIVATE_FILE
    if private.is_file():
        signer = load_signer(folder)
    else:
        signer = Signer(Ed25519PrivateKey.generate())
        write_private(private, signer.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    public = Path(folder) / PUBLIC_FILE
    lines = public.read_text().split() if public.is_file() else []
    if signer.public_text not in lines:  # the current key first; keys of before a rotation stay trusted
        public.write_text("\n".join([signer.public_text, *lines]) + "\n")
    return signer


def load_signer(folder: Path) -> Signer:
    path = Path(folder) / PRIVATE_FILE
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CncError(f"no governance signing key: {path} does not exist") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CncError(f"{path} is not an Ed25519 private key")
    return Signer(key)


def load_verifier(folder: Path) -> Verifier:
    path = Path(folder) / PUBLIC_FILE
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        raise CncError(f"no governance public key: {path} does not exist") from None
    keys = []
    for line in lines:
        try:
            keys.append(Ed25519PublicKey.from_public_bytes(base64.b64decode(line, validate=True)))
        except ValueError:
            raise CncError(f"{path}: {line[:20]}… is not an Ed25519 public key") from None
    return Verifier(keys)


def _secrets_dir() -> Path | None:
    from cncbrain.settings import BusSettings, load_settings

    return load_settings(BusSettings).secrets_dir


def verifier_from_env() -> Verifier | None:
    """The verifier of the secrets folder in `CNC_SECRETS_DIR`; None without one (a brain without
    NATS credentials: nothing is signed, nothing checked)."""
    folder = _secrets_dir()
    return load_verifier(folder) if folder is not None else None


def signer_from_env() -> Signer | None:
    """Governance's signer from `CNC_SECRETS_DIR` (governance only); None without a secrets folder."""
    folder = _secrets_dir()
    return load_signer(folder) if folder is not None else None

"""Signed models: who approved a model file or an export, checked before it is used.

A signature is a small JSON file beside the model (``part.cfm.sig``; ``clipfusion-export.sig`` inside an
export folder) holding an Ed25519 signature (``cryptography``) over the model's identity: the SHA-256 of
the model file, or of an export's manifest, which lists the SHA-256 of every file it reads.  The model
itself is not changed, so its identity (the ``model_id`` of every row) stays the same once signed.

Keys: ``clipfusion keygen`` writes a private key (PEM, readable by its owner only) and its public key
(``.pub``, PEM).  A key is named by its id, the first 16 hex digits of the SHA-256 of its raw public
bytes.  A folder of trusted keys (``--trusted-keys DIR``) holds ``*.pub`` files; its ``revoked.txt`` lists
key ids (one per line, ``#`` comments) whose signatures are refused even while their ``.pub`` is there.
Torch-free: the exported runtime checks signatures too.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from clipfusion.errors import ClipfusionError
from clipfusion.outputs import read_json, write_atomic

SIGNATURE_FORMAT = "clipfusion-signature/1"
EXPORT_SIGNATURE = "clipfusion-export.sig"
REVOKED = "revoked.txt"
DOMAIN = b"clipfusion-model-sha256\0"  # what a signature covers is this prefix and the identity: never another use


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ClipfusionError("signed models need the cryptography package: pip install cryptography") from None
    return ed25519


def _serialization() -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_key: Any) -> str:
    """A public key's id: the first 16 hex digits of the SHA-256 of its raw 32 bytes."""
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(private_path: Path) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair: the private key at ``private_path`` (PEM, mode 0600, never overwritten) and
    the public key beside it with the suffix ``.pub``; (private path, public path, key id)."""
    ed25519, serialization = _crypto(), _serialization()
    public_path = private_path.with_suffix(".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise ClipfusionError(f"{path} exists; a key is never overwritten: choose another --out")
    private_key = ed25519.Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_key = private_key.public_key()
    write_atomic(public_path, public_key.public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, key_id(public_key)


def _load_private(path: Path) -> Any:
    ed25519, serialization = _crypto(), _serialization()
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ClipfusionError(f"--key {path} not found; make one with `clipfusion keygen --out {path}`") from None
    except (ValueError, TypeError) as exc:
        raise ClipfusionError(f"--key {path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ClipfusionError(f"--key {path} is not an Ed25519 key; make one with `clipfusion keygen`")
    return key


def _load_public(path: Path) -> Any:
    ed25519, serialization = _crypto(), _serialization()
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError as exc:
        raise ClipfusionError(f"trusted key {path} is not a PEM public key ({exc}); remove it or replace it") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ClipfusionError(f"trusted key {path} is not an Ed25519 key; remove it or replace it")
    return key


def signature_path(model: Path) -> Path:
    """Where the signature of ``model`` lives: ``X.cfm.sig`` beside a model file, or inside an export."""
    return model / EXPORT_SIGNATURE if model.is_dir() else model.with_name(model.name + ".sig")


def sign(model: Path, identity: str, key_path: Path) -> tuple[Path, str]:
    """Sign the model at ``model`` whose identity (SHA-256) is ``identity`` with the private key at
    ``key_path``; (the signature file written, the key id)."""
    private_key = _load_private(key_path)
    signer = key_id(private_key.public_key())
    signature = private_key.sign(DOMAIN + identity.encode())
    record = {"format": SIGNATURE_FORMAT, "key_id": signer, "sha256": identity,
              "signature": base64.b64encode(signature).decode(), "model": model.name,
              "signed": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = signature_path(model)
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path, signer


@dataclass(frozen=True)
class TrustedKeys:
    """The keys a deployment accepts, by id, and the ids it no longer accepts."""

    folder: Path
    keys: dict[str, Any]
    revoked: frozenset[str]

    @classmethod
    def read(cls, folder: str | Path) -> TrustedKeys:
        """Every ``*.pub`` in ``folder`` and its ``revoked.txt``; a one-line error for an empty or missing folder."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ClipfusionError(f"--trusted-keys {folder} is not a folder; give the folder of approved public "
                                  "keys (*.pub from `clipfusion keygen`)")
        keys = {}
        for path in sorted(folder.glob("*.pub")):
            public_key = _load_public(path)
            keys[key_id(public_key)] = public_key
        revoked_file = folder / REVOKED
        revoked = set()
        if revoked_file.is_file():
            for line in revoked_file.read_text().splitlines():
                text = line.partition("#")[0].strip()
                if text:
                    revoked.add(text)
        if not set(keys) - revoked:
            raise ClipfusionError(f"--trusted-keys {folder} holds no public key that is not revoked; add the .pub "
                                  "of the key that signs your models")
        return cls(folder, keys, frozenset(revoked))


def verify(model: Path, identity: str, trusted: TrustedKeys) -> str:
    """The id of the trusted key that signed the model at ``model`` (identity ``identity``); a one-line error
    when the signature is missing, is for another file, is not valid, or its key is unknown or revoked."""
    path = signature_path(model)
    if not path.is_file():
        raise ClipfusionError(f"--model {model} is not signed ({path.name} not found) and --trusted-keys "
                              f"{trusted.folder} accepts only signed models; sign it with `clipfusion sign {model} "
                              "--key KEY`")
    record = read_json(path, "model signature", "copy it again with the model, or sign the model again")
    if not isinstance(record, dict) or record.get("format") != SIGNATURE_FORMAT:
        raise ClipfusionError(f"{path} is not a {SIGNATURE_FORMAT} signature; sign the model again")
    signer = str(record.get("key_id"))
    if signer in trusted.revoked:
        raise ClipfusionError(f"--model {model} is signed by key {signer}, which {trusted.folder / REVOKED} revokes; "
                              "have it signed with a key in use")
    if signer not in trusted.keys:
        raise ClipfusionError(f"--model {model} is signed by key {signer}, which is not among the trusted keys in "
                              f"{trusted.folder}; add its .pub there if you approve it")
    if record.get("sha256") != identity:
        raise ClipfusionError(f"{path} signs another version of {model.name} (the model changed after it was "
                              "signed); sign the model again, or restore the signed one")
    try:
        trusted.keys[signer].verify(base64.b64decode(str(record.get("signature")), validate=True),
                                    DOMAIN + identity.encode())
    except Exception:  # cryptography's InvalidSignature, or a signature that is not base64
        raise ClipfusionError(f"{path} is not a valid signature of {model.name} by key {signer} (forged or "
                              "damaged); sign the model again") from None
    return signer

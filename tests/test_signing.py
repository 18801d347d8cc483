"""Signed models: ``keygen``, ``sign`` and ``verify``, and ``--trusted-keys`` in ``predict`` and ``serve``
(the torch-free runtime's is in test_export.py): a valid signature runs and names its key in the rows
and in /v1/models; a missing, foreign, revoked or forged signature, or a model changed after it was
signed, is one line and exit 2, before anything is scored."""
from __future__ import annotations

import hashlib
import json
import shutil
import stat
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from .commands import clipfusion, clipfusion_here, results
from .servers import start_server


def make_key(folder: Path, name: str) -> tuple[Path, str]:
    """``clipfusion keygen``; (private key, its id computed here from the .pub: SHA-256 of the raw bytes)."""
    done = clipfusion_here("keygen", "--out", str(folder / f"{name}.key"))
    assert done.returncode == 0, done.stderr
    public = serialization.load_pem_public_key((folder / f"{name}.pub").read_bytes())
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return folder / f"{name}.key", hashlib.sha256(raw).hexdigest()[:16]


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    """Two keys (quality: trusted; stranger: not) and a trusted folder holding quality.pub only."""
    made = {name: make_key(tmp_path, name) for name in ("quality", "stranger")}
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(tmp_path / "quality.pub", trusted)
    return {**made, "trusted": trusted}


@pytest.fixture
def signed(model: Path, keys: dict, tmp_path: Path) -> Path:
    copy = tmp_path / "disc.cfm"
    shutil.copy(model, copy)
    done = clipfusion_here("sign", str(copy), "--key", str(keys["quality"][0]))
    assert done.returncode == 0 and keys["quality"][1] in done.stdout, done.stderr
    return copy


def refused(*args: str) -> str:
    """The one line of a command that must refuse: exit 2, no traceback."""
    done = clipfusion_here(*args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


def test_keygen_writes_a_private_key_for_its_owner_only_and_never_overwrites(keys, tmp_path):
    assert stat.S_IMODE((tmp_path / "quality.key").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in (tmp_path / "quality.key").read_bytes()
    assert "exists" in refused("keygen", "--out", str(tmp_path / "quality.key"))


def test_a_signed_model_verifies_and_its_signer_is_in_every_row(signed, keys, synthetic_root, tmp_path):
    done = clipfusion_here("verify", str(signed), "--trusted-keys", str(keys["trusted"]))
    assert done.returncode == 0 and keys["quality"][1] in done.stdout
    record = json.loads(signed.with_name("disc.cfm.sig").read_text())
    assert record["sha256"] == hashlib.sha256(signed.read_bytes()).hexdigest()
    images = synthetic_root / "disc" / "test" / "good"
    run = clipfusion_here("predict", str(images), "--model", str(signed), "--trusted-keys", str(keys["trusted"]),
                          "--out", str(tmp_path / "out"), "--quiet")
    assert run.returncode == 0, run.stderr
    rows = results(tmp_path / "out")
    assert rows and {row["signer"] for row in rows} == {keys["quality"][1]}
    plain = clipfusion_here("predict", str(images), "--model", str(signed), "--out", str(tmp_path / "plain"), "--quiet")
    assert plain.returncode == 0 and {row["signer"] for row in results(tmp_path / "plain")} == {None}


def test_missing_foreign_revoked_and_forged_signatures_and_changed_models_are_refused(signed, keys, synthetic_root,
                                                                                      tmp_path):
    images = str(synthetic_root / "disc" / "test" / "good")

    def predict(model: Path) -> str:
        line = refused("predict", images, "--model", str(model), "--trusted-keys", str(keys["trusted"]),
                       "--out", str(tmp_path / "never"))
        assert not (tmp_path / "never").exists()  # refused before anything was written
        return line

    unsigned = tmp_path / "unsigned.cfm"
    shutil.copy(signed, unsigned)
    assert "is not signed" in predict(unsigned)
    foreign = tmp_path / "foreign.cfm"
    shutil.copy(signed, foreign)
    assert clipfusion_here("sign", str(foreign), "--key", str(keys["stranger"][0])).returncode == 0
    assert f"key {keys['stranger'][1]}, which is not among the trusted keys" in predict(foreign)
    signature = signed.with_name("disc.cfm.sig")
    record = json.loads(signature.read_text())
    text = record["signature"]
    forged = dict(record, signature=text[:10] + ("B" if text[10] == "A" else "A") + text[11:])  # one bit-flip away
    signature.write_text(json.dumps(forged))
    assert "not a valid signature" in predict(signed)
    signature.write_text(json.dumps(record))
    (keys["trusted"] / "revoked.txt").write_text(f"# leaked on 2026-12-01\n{keys['quality'][1]}\n")
    assert "no public key that is not revoked" in predict(signed)
    shutil.copy(keys["stranger"][0].with_suffix(".pub"), keys["trusted"])
    assert "revokes" in predict(signed)
    (keys["trusted"] / "revoked.txt").unlink()
    changed = tmp_path / "changed.cfm"
    shutil.copy(signed, changed)
    shutil.copy(signature, changed.with_name("changed.cfm.sig"))
    done = clipfusion_here("calibrate", "--model", str(signed), "--normal", str(synthetic_root / "disc" / "train" /
                                                                                "good"), "--out", str(changed),
                           "--dtype", "float32", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "signs another version" in predict(changed)
    assert "checks the signature of --model" in refused("predict", images, "--trusted-keys", str(keys["trusted"]),
                                                        "--out", str(tmp_path / "never"))


def test_serve_shows_the_signer_and_refuses_an_unsigned_model_before_it_listens(signed, keys, synthetic_root,
                                                                                 tmp_path):
    server = start_server([signed], tmp_path / "data", "--trusted-keys", str(keys["trusted"]))
    try:
        (served,) = httpx.get(f"{server.url}/v1/models", timeout=30).json()
        assert served["signer"] == keys["quality"][1]
        image = next((synthetic_root / "disc" / "test").rglob("*.png"))
        answer = httpx.post(f"{server.url}/v1/models/disc/inspect", files={"files": (image.name, image.read_bytes())},
                            timeout=120)
        assert answer.status_code == 200 and answer.json()["inspections"][0]["signer"] == keys["quality"][1]
    finally:
        server.stop()
    unsigned = tmp_path / "other" / "disc.cfm"
    unsigned.parent.mkdir()
    shutil.copy(signed, unsigned)
    done = clipfusion("serve", "--model", str(unsigned), "--trusted-keys", str(keys["trusted"]), "--data",
                      str(tmp_path / "data2"), "--port", "9")
    assert done.returncode == 2 and "is not signed" in done.stderr and "Traceback" not in done.stderr
    assert "--learn writes new model versions" in refused("serve", "--model", str(signed), "--trusted-keys",
                                                           str(keys["trusted"]), "--learn")

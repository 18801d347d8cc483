"""Learning from operators: a confirmed false alarm joins its model's memory bank as a new model
file version (written atomically beside the old), the thresholds are re-derived from held-out
normal images, every change goes to the audit table, and any change can be rolled back."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from clipfusion.data.base import read_rgb
from clipfusion.inspection.fingerprint import NormalScore, take_fingerprint
from clipfusion.inspection.thresholds import score_normals
from clipfusion.outputs import file_sha256
from clipfusion.service.errors import ServiceError
from clipfusion.service.inspector import ServedModel
from clipfusion.service.schemas import ChangeOut
from clipfusion.service.tables import Audit, Feedback, Inspection, ModelVersion

REFERENCE_PREFIX = "inspection:"  # how a learned reference is named in the bank and the model card


def active_version(session: Session, name: str) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.active)).first()


def _held_out_normals(session: Session, model: ServedModel, in_bank: set[str]) -> list[Path]:
    """Stored images of this model's inspections that operators confirmed normal and that are not in
    its bank: the normal images the thresholds can be re-derived from."""
    rows = session.execute(select(Inspection.id, Inspection.image).join(Feedback).where(
        Inspection.model == model.name, Feedback.label == "normal", Inspection.image.is_not(None))).all()
    folder = model.settings.images_dir
    if folder is None:
        return []
    return sorted({folder / image for identifier, image in rows if image and identifier not in in_bank})


def learn(session: Session, model: ServedModel, inspection: Inspection, actor: str) -> ChangeOut:
    """Add ``inspection``'s stored image to ``model``'s bank, re-derive its thresholds, write and serve
    the new version (``actor``: the acting key's name, "" with no keys).  Runs in the model's thread; the
    caller commits ``session``."""
    folder = model.settings.images_dir
    if inspection.image is None or folder is None or not (folder / inspection.image).is_file():
        raise ServiceError(409, "image_not_stored", f"inspection {inspection.id} kept no image (deleted by "
                                                    "--keep-days, or made before --learn): nothing to learn from")
    if model.model.is_export:
        raise ServiceError(409, "cannot_learn", f"model {model.name} is an export, which cannot learn; serve its "
                                                "model file to learn from false alarms")
    from clipfusion.methods.clipfusion.detector import CLIPFusion  # torch: not for exports, which never learn

    reference = f"{REFERENCE_PREFIX}{inspection.id}"
    if any(entry["name"] == reference for entry in model.card.references):  # learned already (a race, a retry)
        raise ServiceError(409, "already_learned", f"inspection {inspection.id} is in model {model.name}'s bank "
                                                   "already")

    before = model.card.thresholds
    detector = CLIPFusion.load(model.path, model.settings.runtime, model.settings.batch_size, card=model.card)
    detector.add_references([read_rgb(folder / inspection.image)], model.category, [reference])
    in_bank = {name.removeprefix(REFERENCE_PREFIX) for name in detector.memory_bank_.manifest["references"]}
    normals = _held_out_normals(session, model, in_bank)
    scored: list[NormalScore] = []
    if len(normals) >= model.settings.min_normals:
        derived = score_normals(detector, normals, model.category, model.settings.batch_size,
                                model.settings.max_pixels)
        detector.set_thresholds(derived.thresholds, model.category)
        scored = derived.fingerprint_entries()
        note = f"thresholds re-derived from {len(normals)} operator-confirmed normal images not in the bank"
    else:
        note = (f"thresholds kept: {len(normals)} operator-confirmed normal images outside the bank, fewer than the "
                f"{model.settings.min_normals} (--min-normals) to derive them from")
    references = [*model.card.references, {"name": reference,
                                           "sha256": file_sha256(folder / inspection.image)}]
    folder = model.settings.data_dir / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.cfm"
    detector.save(path, references, take_fingerprint(detector, model.category, scored).to_json())
    model.use(path)
    parent = active_version(session, model.name)
    if parent is not None:
        parent.active = False
    version = ModelVersion(name=model.name, path=str(path.resolve()), sha256=model.sha256,
                           created=datetime.now(timezone.utc), active=True,
                           parent_id=None if parent is None else parent.id)
    session.add(version)
    session.flush()
    change = ChangeOut(action="learn", version_id=version.id, sha256=version.sha256,
                       image_threshold_before=before.image, image_threshold_after=model.card.thresholds.image,
                       bank_size=model.bank_size, note=note)
    _audit(session, model.name, change, actor, {"inspection": inspection.id,
                                                "from_version": None if parent is None else parent.id})
    return change


def rollback(session: Session, model: ServedModel, actor: str) -> ChangeOut:
    """Serve the version the active one was learned from.  Runs in the model's thread."""
    current = active_version(session, model.name)
    if current is None or current.parent_id is None:
        raise ServiceError(409, "no_earlier_version", f"model {model.name} has no earlier version to roll back to")
    parent = session.get(ModelVersion, current.parent_id)
    assert parent is not None
    if not Path(parent.path).is_file():
        raise ServiceError(409, "version_missing", f"the earlier version's file {parent.path} is gone")
    before = model.card.thresholds.image
    model.use(Path(parent.path))
    current.active, parent.active = False, True
    change = ChangeOut(action="rollback", version_id=parent.id, sha256=parent.sha256, image_threshold_before=before,
                       image_threshold_after=model.card.thresholds.image, bank_size=model.bank_size,
                       note=f"back from version {current.id}")
    _audit(session, model.name, change, actor, {"from_version": current.id})
    return change


def _audit(session: Session, name: str, change: ChangeOut, actor: str, extra: dict[str, object]) -> None:
    detail = {**extra, "version": change.version_id, "sha256": change.sha256,
              "image_threshold": [change.image_threshold_before, change.image_threshold_after],
              "bank_size": change.bank_size, "note": change.note}
    session.add(Audit(created=datetime.now(timezone.utc), action=change.action, model=name,
                      detail=json.dumps(detail), actor=actor or None))

"""Request and response bodies of the API (pydantic), as the OpenAPI page at /docs shows them."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field


class ErrorOut(BaseModel):
    """Every error: a stable machine-readable ``code`` and a one-line ``detail`` for people."""

    code: str
    detail: str
    request_id: str = Field("", description="the request's id (X-Request-ID): the service log names the cause of "
                                            "a 500 under it")


class RegionOut(BaseModel):
    x: int = Field(description="left edge, in the image's own pixels")
    y: int = Field(description="top edge, in the image's own pixels")
    width: int
    height: int
    area: int = Field(description="anomalous pixels in the region")
    peak: float = Field(description="highest map value in the region")


class MessageOut(BaseModel):
    """An inspection as the message every ``--publish`` receiver gets (``clipfusion.inspection/1``,
    docs/line.md): the same shape from the REST API, MQTT, webhooks and ``watch``."""

    schema_: str = Field(alias="schema", description="clipfusion.inspection/1")
    id: str = Field(description="the inspection's id: a receiver's idempotency key")
    model: str = Field(description="the model's SHA-256")
    model_name: str
    category: str | None
    source: str = Field(description="the upload's file name")
    time: str = Field(description="UTC, ISO 8601")
    decision: str
    score: float
    normalised_score: float | None
    threshold: float | None
    regions: list[RegionOut]
    width: int = Field(description="the image's width in pixels")
    height: int = Field(description="the image's height in pixels")


class FeedbackIn(BaseModel):
    label: Literal["normal", "anomalous"] = Field(description="normal: a false alarm (if it was NG); anomalous: a "
                                                              "confirmed defect (or a miss, if it was OK)")
    note: str = Field("", max_length=2000)


class ChangeOut(BaseModel):
    """What learning or a rollback did to a model (also what the audit table records)."""

    action: Literal["learn", "rollback"]
    version_id: int
    sha256: str
    image_threshold_before: float
    image_threshold_after: float
    bank_size: int
    note: str


class FeedbackOut(FeedbackIn):
    id: int
    created: datetime
    learned: Annotated[ChangeOut | None, Field(description="with --learn: the model version this false alarm "
                                                           "made")] = None
    learning: Annotated[str | None, Field(description="with --learn, why this false alarm was not learned from "
                                                      "(an operator key: an admin confirms it with POST "
                                                      "/v1/inspections/ID/learn)")] = None
    actor: Annotated[str | None, Field(description="the name of the API key that gave it")] = None


class VersionOut(BaseModel):
    id: int
    sha256: str
    path: str
    created: datetime
    active: bool
    parent_id: int | None


class AuditOut(BaseModel):
    id: int
    created: datetime
    action: str
    model: str
    detail: dict[str, object]
    actor: str | None = Field(None, description="the name of the API key that made the change (None: no keys)")


class InspectionOut(BaseModel):
    id: str
    model: str
    model_sha256: str
    created: datetime
    filename: str
    width: int
    height: int
    score: float
    normalised_score: float | None = Field(description="0.5 at the threshold")
    decision: str = Field(description="OK or NG")
    threshold: float | None
    seconds: float = Field(description="this image's time in the service: decoding, queue, model, files, database")
    regions: list[RegionOut]
    overlay_url: str
    mask_url: str | None
    signer: str | None = Field(None, description="the trusted key that signed the model which decided it "
                                                 "(--trusted-keys); null when signatures were not checked")
    feedback: list[FeedbackOut] = []


class FailedOut(BaseModel):
    """An image of the request that has no inspection, and why (the others are inspected all the same)."""

    index: int = Field(description="its position among the request's files, from 0")
    filename: str
    code: str = Field(description="unreadable_image, image_too_large, not_finite or storage_failed")
    detail: str


class InspectOut(BaseModel):
    inspections: list[InspectionOut]
    failed: list[FailedOut] = Field([], description="the images that could not be inspected, each with its reason")


class InspectionPage(BaseModel):
    items: list[InspectionOut]
    total: int
    limit: int
    offset: int


class DriftWindowOut(BaseModel):
    """The last finished drift window (``inspection.drift``)."""

    images: int
    ok_images: int
    ks_statistic: float | None = Field(description="two-sample KS statistic: OK scores against the reference")
    ks_p_value: float | None
    median_shift: float | None = Field(description="shift of the OK scores' median, in margins (the threshold "
                                                   "minus the reference median)")
    p95_shift: float | None = Field(description="shift of the OK scores' 95th percentile, in margins")
    ng_rate: float
    implied_ng_rate: float = Field(description="the NG rate the thresholds imply on the reference")
    ng_p_value: float
    bad: bool
    why: str


class DriftOut(BaseModel):
    state: Literal["insufficient data", "ok", "drifting", "alarm"]
    detail: str
    images: int = Field(description="verdicts of this version seen")
    windows: int
    bad_in_a_row: int
    last: DriftWindowOut | None


class SelfCheckOut(BaseModel):
    """The check at load: the probe images scored against the model's fingerprint."""

    verdict: str = Field(description="same, within tolerance, or different (served only with --self-check warn)")
    largest_difference: float
    tolerance: float
    causes: list[str] = Field(description="what changed since the thresholds were set")


class ModelHealthOut(BaseModel):
    name: str
    sha256: str = Field(description="the version served")
    self_check: SelfCheckOut | None = Field(description="null: --self-check off, or a model without fingerprint")
    drift: DriftOut


class ModelOut(BaseModel):
    name: str
    category: str
    preset: str
    image_threshold: float
    pixel_threshold: float
    bank_size: int = Field(description="references in the memory bank (0: zero-shot)")
    version: str = Field(description="clipfusion version that wrote the model file")
    precision: str = Field(description="the dtype the model runs in here (float32, bfloat16, float16)")
    thresholds_precision: str = Field(description="the dtype its thresholds were derived in (the model file's)")
    signer: str | None = Field(None, description="the id of the trusted key whose signature of this model was "
                                                 "verified (--trusted-keys); null when signatures are not checked")
    sha256: str
    created: str
    queue_depth: int

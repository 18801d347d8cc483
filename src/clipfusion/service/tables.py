"""The inspection database's tables (SQLAlchemy ORM): inspections, their regions, operators'
feedback, model versions and the audit trail.  The schema is created by the Alembic migrations in
``migrations/``, never by ``create_all``: a test checks that they agree."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Inspection(Base):
    """One scored image."""

    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    model: Mapped[str] = mapped_column(String(200), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    normalised_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    decision: Mapped[str] = mapped_column(String(16), index=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)
    overlay: Mapped[str] = mapped_column(String(500))
    mask: Mapped[str | None] = mapped_column(String(500), nullable=True)
    image: Mapped[str | None] = mapped_column(String(500), nullable=True)  # its file in the kept-uploads folder
    # the trusted key that signed the model which decided it (--trusted-keys); None: signatures not checked
    signer: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # the request's Idempotency-Key (``KEY``, or ``KEY/N`` for its N-th image): a retried request finds it
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True, index=True)
    regions: Mapped[list[Region]] = relationship(back_populates="inspection", cascade="all, delete-orphan",
                                                 order_by="Region.id")
    feedback: Mapped[list[Feedback]] = relationship(back_populates="inspection", cascade="all, delete-orphan",
                                                    order_by="Feedback.id")


class Region(Base):
    """An anomalous region of an inspection, in the image's own pixels."""

    __tablename__ = "regions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    area: Mapped[int] = mapped_column(Integer)
    peak: Mapped[float] = mapped_column(Float)
    inspection: Mapped[Inspection] = relationship(back_populates="regions")


class Feedback(Base):
    """An operator's verdict on an inspection: ``normal`` (a false alarm if it was NG) or ``anomalous``."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str | None] = mapped_column(String(100), nullable=True)  # the API key's name; None: keys off
    inspection: Mapped[Inspection] = relationship(back_populates="feedback")


class ModelVersion(Base):
    """A model file the service has served: the active one per name answers requests."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", name="fk_model_versions_parent"),
                                                  nullable=True)  # the version it was learned from


class Audit(Base):
    """Every change the service makes to a model, with what and why (JSON text)."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    action: Mapped[str] = mapped_column(String(50))
    model: Mapped[str] = mapped_column(String(200))
    detail: Mapped[str] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(100), nullable=True)  # the API key's name; None: keys off

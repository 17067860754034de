"""The registry's tables.

adapters 1-n versions; a version has files (its manifest), modules (per-module rank, alpha and shape,
so checks and merges can query without opening files), tags (per adapter, pointing at a version) and
lineage rows (the parents of a combined adapter, by digest). base_models holds fingerprinted base
models, which versions may point at.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # canonical (PEP 503) name
    display_name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    versions: Mapped[list[AdapterVersion]] = relationship(back_populates="adapter", cascade="all, delete-orphan")
    tags: Mapped[list[Tag]] = relationship(back_populates="adapter", cascade="all, delete-orphan")


class BaseModel(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    revision: Mapped[str | None] = mapped_column(String(100))
    source: Mapped[str | None] = mapped_column(Text)
    architecture: Mapped[str | None] = mapped_column(String(200))
    structural_fingerprint: Mapped[str] = mapped_column(String(80), index=True)
    structural_dtype_fingerprint: Mapped[str | None] = mapped_column(String(80))
    content_digest: Mapped[str | None] = mapped_column(String(80))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AdapterVersion(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "version", name="uq_versions_adapter_version"),
        Index("ix_versions_adapter_key", "adapter_id", "version_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(100))  # normalised PEP 440
    # sorts as the versions do (registry_schema.version_key); NULL only on a row no loramgr wrote
    version_key: Mapped[str | None] = mapped_column(String(400))
    digest: Mapped[str] = mapped_column(String(80), index=True)  # sha256 of the manifest
    format: Mapped[str] = mapped_column(String(40))
    adapter_type: Mapped[str] = mapped_column(String(40))
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    use_dora: Mapped[bool] = mapped_column(Boolean, default=False)
    base_model_name: Mapped[str | None] = mapped_column(String(300))
    base_model_revision: Mapped[str | None] = mapped_column(String(100))
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id", ondelete="SET NULL"))
    task_type: Mapped[str | None] = mapped_column(String(60))
    n_modules: Mapped[int] = mapped_column(Integer)
    n_params: Mapped[int] = mapped_column(BigInteger)
    size: Mapped[int] = mapped_column(BigInteger)  # bytes over all files
    source: Mapped[str | None] = mapped_column(Text)  # path or hf://repo@commit it was installed from
    source_details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # AdapterInfo.summary() + module specs
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # how a combined adapter was made
    installed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    files: Mapped[list[File]] = relationship(
        back_populates="version", cascade="all, delete-orphan", order_by="File.path"
    )
    modules: Mapped[list[Module]] = relationship(cascade="all, delete-orphan", order_by="Module.name")
    parents: Mapped[list[Lineage]] = relationship(cascade="all, delete-orphan", order_by="Lineage.position")


class File(Base):
    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("version_id", "path", name="uq_files_version_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(500))
    digest: Mapped[str] = mapped_column(String(80), index=True)
    size: Mapped[int] = mapped_column(BigInteger)

    version: Mapped[AdapterVersion] = relationship(back_populates="files")


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("adapter_id", "tag", name="uq_tags_adapter_tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    tag: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)

    adapter: Mapped[Adapter] = relationship(back_populates="tags")
    version: Mapped[AdapterVersion] = relationship()


class Module(Base):
    __tablename__ = "modules"
    __table_args__ = (Index("ix_modules_version_name", "version_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(500))
    kind: Mapped[str] = mapped_column(String(20))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    in_features: Mapped[int] = mapped_column(Integer)
    out_features: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(20))


class Lineage(Base):
    __tablename__ = "lineage"
    __table_args__ = (UniqueConstraint("child_id", "position", name="uq_lineage_child_position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    parent_digest: Mapped[str] = mapped_column(String(80), index=True)
    parent_name: Mapped[str] = mapped_column(String(200))
    parent_version: Mapped[str] = mapped_column(String(100))
    weight: Mapped[float] = mapped_column(Float)


class RegistryMeta(Base):
    """Facts about the registry itself; ``registry_id`` is also written to ``<home>/registry.json``."""

    __tablename__ = "registry_meta"

    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(Text)

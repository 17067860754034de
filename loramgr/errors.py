"""loramgr's exceptions: one tree under :class:`LoramgrError`.

::

    LoramgrError                    every error a user can act on; the CLI prints ``str(err)``, exit 1
    ├── InvalidAdapterError         an adapter's files are wrong (file, module, what to do)
    │   └── UnsupportedAdapterError an adapter type or feature an operation cannot handle
    │       └── UnsupportedFeatureError a part besides the LoRA deltas (modules_to_save, biases, token rows)
    ├── InvalidReferenceError       a reference or version string that does not parse
    ├── NotFoundError (KeyError)    a reference, tag or digest that matches nothing
    ├── AmbiguousReferenceError     a digest prefix that matches more than one adapter version
    ├── ConflictError               a version that exists with other bytes, a tag in the way
    │   └── DestinationExistsError  an output file or folder that is already there
    ├── IntegrityError              a stored blob whose bytes no longer match its digest
    ├── IncompatibleError           adapters that cannot be combined or applied together
    ├── MergeError (ValueError)     bad merge parameters (weights, density, rank)
    │   ├── MergeOptionError        an option unknown, missing, out of range or unused by the method (exit 2)
    │   ├── NothingToMergeError     no source, or a result that would only copy its one source
    │   └── MissingRecipeError      a version that was not made by combine or compress
    ├── InvalidRecipeError (ValueError) a recipe file that is missing, not TOML or incomplete
    ├── RegistryError               the database cannot be opened or is from a newer loramgr
    ├── SettingError                an environment setting (LORAMGR_HOME, LORAMGR_DATABASE_URL) that cannot work
    ├── HubError                    a Hub repository, revision or download problem
    ├── OciError                    an OCI registry, repository, tag, credential or transfer problem
    ├── ServerError                 a serving engine that refused a load or unload, or cannot be reached
    ├── InvalidBaseModelError       a base model whose files cannot be fingerprinted
    ├── EngineSpecError (ValueError) an ``--engine`` value that does not parse
    ├── MissingDependencyError (ImportError) an optional package an operation needs
    ├── ProjectFileError            a loramgr.toml / loramgr.lock that is missing, not TOML or malformed
    ├── UnknownFormatError (ValueError) an export format loramgr cannot write
    ├── FieldLimitError (ValueError) a value longer than the registry keeps, or holding a NUL character
    └── StoreWriteError             the blob store could not be written (disk full, no permission)

Each error carries the facts as fields and a ``hint`` saying what to do; ``str(err)`` is one line
that ends with the hint, ready for a terminal, and :meth:`LoramgrError.to_dict` is the same for a
program (what ``loramgr --json`` prints on a failure).
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any


class LoramgrError(Exception):
    """Base class of every error loramgr raises for something the user can fix."""

    #: the CLI's exit status for this error: 1, or 2 for a usage error (as click's own)
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}: {self.hint}"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """``{"error": message, "hint": hint, "type": class name, <each fact field>}``, JSON-able."""
        facts = {key: _jsonable(value) for key, value in vars(self).items()
                 if key not in ("message", "hint") and not key.startswith("_")}
        return {"error": self.message, "hint": self.hint, "type": type(self).__name__, **facts}


def _jsonable(value: Any) -> Any:
    """A fact as JSON can hold it: containers kept; paths, NaN, infinities and anything else as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return str(value)


class InvalidAdapterError(LoramgrError):
    """An adapter's files are malformed: names the file (and module) at fault."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        module: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = path
        self.module = module
        super().__init__(message, hint=hint)


class UnsupportedAdapterError(InvalidAdapterError):
    """An adapter type or feature that the requested operation cannot handle correctly."""

    def __init__(self, message: str, *, adapter_type: str | None = None, **kwargs: object) -> None:
        self.adapter_type = adapter_type
        super().__init__(message, **kwargs)  # type: ignore[arg-type]


class InvalidReferenceError(LoramgrError, ValueError):
    """A reference (``name==1.0``, ``name>=1,<2``, ``name@tag``, ``sha256:ab12``) that does not parse."""

    def __init__(self, message: str, *, reference: str, hint: str | None = None) -> None:
        self.reference = reference
        super().__init__(message, hint=hint)


class NotFoundError(LoramgrError, KeyError):
    """A reference that matches nothing in the registry."""

    def __init__(self, message: str, *, reference: str, hint: str | None = None) -> None:
        self.reference = reference
        super().__init__(message, hint=hint)

    # KeyError.__str__ would quote the message
    __str__ = LoramgrError.__str__


class AmbiguousReferenceError(LoramgrError):
    """A digest prefix that matches several adapter versions."""

    def __init__(self, message: str, *, reference: str, candidates: list[str]) -> None:
        self.reference = reference
        self.candidates = candidates
        super().__init__(message, hint="use a longer digest prefix or name==version")


class ConflictError(LoramgrError):
    """An operation that would change something immutable (a version's bytes) or overwrite a file."""


class IntegrityError(LoramgrError):
    """Stored bytes that no longer match their digest."""

    def __init__(self, message: str, *, digest: str | None = None, hint: str | None = None) -> None:
        self.digest = digest
        super().__init__(message, hint=hint)


class IncompatibleError(LoramgrError):
    """Adapters that do not fit each other, a base model, or an engine."""


class MergeError(LoramgrError, ValueError):
    """Merge parameters out of range (weights, density, rank, energy)."""


class RegistryError(LoramgrError):
    """The registry cannot be used: its database is unreachable, damaged, from a newer loramgr, or does
    not belong to the blob store beside it. ``database`` names the file (or the URL without password)."""

    def __init__(self, message: str, *, database: str | None = None, hint: str | None = None) -> None:
        self.database = database
        self.retryable = False  # a serialisation failure that running the transaction again may cure
        super().__init__(message, hint=hint)


class SettingError(LoramgrError):
    """An environment setting that cannot work as given: ``setting`` names it (``LORAMGR_HOME``,
    ``LORAMGR_DATABASE_URL``), ``value`` is what it holds (a database URL without its password)."""

    def __init__(self, message: str, *, setting: str, value: str, hint: str | None = None) -> None:
        self.setting = setting
        self.value = value
        super().__init__(message, hint=hint)


class HubError(LoramgrError):
    """A Hugging Face Hub repository, revision, authentication or download problem."""


class OciError(LoramgrError):
    """An OCI registry, repository, tag, credential or transfer problem."""

    def __init__(self, message: str, *, reference: str | None = None, status: int | None = None,
                 hint: str | None = None) -> None:
        self.reference = reference
        self.status = status
        super().__init__(message, hint=hint)


class ServerError(LoramgrError):
    """A serving engine refused a load or unload request, or could not be reached."""

    def __init__(self, message: str, *, url: str, status: int | None = None, hint: str | None = None) -> None:
        self.url = url
        self.status = status
        super().__init__(message, hint=hint)


class InvalidBaseModelError(LoramgrError):
    """A base model whose files cannot be fingerprinted: names the path (and the tensor) at fault."""

    def __init__(self, message: str, *, path: str, tensor: str | None = None, hint: str | None = None) -> None:
        self.path = path
        self.tensor = tensor
        super().__init__(message, hint=hint)


class EngineSpecError(LoramgrError, ValueError):
    """An ``--engine`` value that does not parse: the engine named, and the option at fault if any."""

    def __init__(self, message: str, *, engine: str, option: str | None = None, hint: str | None = None) -> None:
        self.engine = engine
        self.option = option
        super().__init__(message, hint=hint)


class MissingDependencyError(LoramgrError, ImportError):
    """An optional package that an operation needs is not installed; the hint says how to install it."""

    def __init__(self, message: str, *, package: str, hint: str) -> None:
        self.package = package
        super().__init__(message, hint=hint)

    __str__ = LoramgrError.__str__


class DestinationExistsError(ConflictError):
    """An export or write whose destination already holds something (never overwritten)."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        self.path = path
        super().__init__(message, hint=hint)


class ProjectFileError(LoramgrError):
    """A project file (``loramgr.toml``, ``loramgr.lock``) that is missing, not TOML, or has a bad entry."""

    def __init__(self, message: str, *, path: str, entry: str | None = None, hint: str | None = None) -> None:
        self.path = path
        self.entry = entry  # the adapter entry at fault, when one is
        super().__init__(message, hint=hint)


class UnknownFormatError(LoramgrError, ValueError):
    """A file format loramgr cannot write (``export --format``)."""

    def __init__(self, message: str, *, format: str, known: tuple[str, ...]) -> None:
        self.format = format
        self.known = known
        super().__init__(message, hint=f"use one of {', '.join(known)}")


class MergeOptionError(MergeError):
    """A merge option that is unknown, missing, out of range, or not used by the chosen method.

    ``option`` is the option's name (a :class:`~loramgr.merge.MergeOptions` field such as
    ``density``, or ``name``); the message spells it as the CLI flag (``--density``). On the command
    line it is a usage error, so it exits 2 like click's own.
    """

    exit_code = 2

    def __init__(self, message: str, *, option: str, value: object = None, hint: str | None = None) -> None:
        self.option = option
        self.value = value
        super().__init__(message, hint=hint)


class NothingToMergeError(MergeError):
    """A combine or compress with no source, or whose result would only be a copy of its one source."""

    def __init__(
        self, message: str, *, operation: str, reference: str | None = None, hint: str | None = None
    ) -> None:
        self.operation = operation
        self.reference = reference
        super().__init__(message, hint=hint)


class MissingRecipeError(MergeError):
    """A version or an in-memory adapter with no recipe: it was not made by combine or compress."""


class InvalidRecipeError(LoramgrError, ValueError):
    """A recipe file that is missing, not TOML, or lacks its sources or its method."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        self.path = path
        super().__init__(message, hint=hint)


class FieldLimitError(LoramgrError, ValueError):
    """A value the registry cannot keep as given: longer than its column allows, or holding a NUL.

    Checked before anything is stored, identically for SQLite (which would keep it) and PostgreSQL
    (which would refuse it mid-transaction), so a registry can move between the two.
    """

    def __init__(self, message: str, *, field: str, limit: int | None = None, hint: str | None = None) -> None:
        self.field = field
        self.limit = limit
        super().__init__(message, hint=hint)


class StoreWriteError(LoramgrError):
    """A file that could not be written into the blob store; ``path`` is the file being stored."""

    def __init__(self, message: str, *, path: str, hint: str | None = None) -> None:
        self.path = path
        super().__init__(message, hint=hint)


class InvalidConfigFieldError(InvalidAdapterError):
    """A field of an adapter's config (adapter_config.json, or the config a file's metadata carries) has the
    wrong type or range: names the file and the field."""

    def __init__(self, message: str, *, path: str, field: str, hint: str | None = None) -> None:
        self.field = field
        super().__init__(message, path=path, hint=hint or "fix the field, or re-save the adapter with PEFT")


class UnsupportedFeatureError(UnsupportedAdapterError):
    """A part of an adapter besides its low-rank deltas (``feature``: modules_to_save, bias, lora_bias,
    trainable_tokens) that an operation cannot carry exactly; ``module`` names where it is."""

    def __init__(self, message: str, *, feature: str, module: str, path: str | None = None,
                 hint: str | None = None) -> None:
        self.feature = feature
        super().__init__(message, path=path, module=module, hint=hint)

"""The in-memory description of an adapter, shared by every file format, the registry and the merges.

An adapter file is read into an :class:`AdapterInfo` (metadata only, no tensors kept) whose
:class:`ModuleSpec` entries say, per adapted module of the base model, its rank, alpha, shapes and
which tensor keys of the weights file hold its factors. :class:`LoraAdapter` pairs that description
with the weights file and loads the factors of one module at a time, so merges stream.

Conventions: for every module ΔW = scale · B · A with A: rank x in_features and
B: out_features x rank. Convolution factors are flattened (A to rank x in·kh·kw, B to out x rank);
``kernel`` keeps the original shape of A. PEFT embedding LoRA stores ``lora_embedding_A`` as
rank x num_embeddings and ``lora_embedding_B`` as dim x rank, so for ``kind == "embedding"``
B · A is the transpose of the embedding weight's delta; merges treat every kind alike because all
sources share the layout.

This module must not import torch at import time (``loramgr list`` stays fast).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch
    from numpy.typing import NDArray

    from .merge.tensorfile import TensorFile

#: adapter types loramgr recognises; only "lora" can be summed and converted freely
ADAPTER_TYPES = ("lora", "dora", "loha", "lokr", "full", "ia3", "glora", "oft", "boft", "lora_tucker")


def factors_fit(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> bool:
    """Whether A [r, in(, kh, kw)] and B [out, r(, 1, 1)] are the two factors of one delta."""
    return len(shape_a) >= 2 and len(shape_b) >= 2 and shape_b[1] == shape_a[0] and all(d == 1 for d in shape_b[2:])


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module: its name in the base model, rank, alpha, shapes and tensor keys."""

    name: str
    rank: int
    alpha: float
    in_features: int
    out_features: int
    key_a: str
    key_b: str
    dtype: str = "float32"
    kind: str = "linear"  # "linear" | "conv" | "embedding"
    use_rslora: bool = False
    kernel: tuple[int, ...] | None = None  # conv: shape of the unflattened A (rank, in, kh, kw)
    key_alpha: str | None = None  # kohya stores alpha as a tensor
    extra_keys: tuple[str, ...] = ()  # other tensors of this module (e.g. DoRA magnitude)
    key_bias: str | None = None  # PEFT lora_bias=True: lora_B.bias, the output gains scale · bias

    @property
    def scale(self) -> float:
        """s in ΔW = s · B · A: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    @property
    def n_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @classmethod
    def from_factors(
        cls, name: str, a: tuple[str, tuple[int, ...]], b: tuple[str, tuple[int, ...]], **fields: Any
    ) -> ModuleSpec:
        """A linear or convolution module from its factors' (key, shape): A [r, in(, kh, kw)], B [out, r(, 1, 1)].

        The caller has checked the shapes (:func:`factors_fit`); ``fields`` are the other ModuleSpec
        fields (alpha, dtype, use_rslora, key_alpha, extra_keys); alpha defaults to the rank.
        """
        (key_a, shape_a), (key_b, shape_b) = a, b
        conv = len(shape_a) > 2
        fields.setdefault("alpha", float(shape_a[0]))
        return cls(name=name, rank=shape_a[0], in_features=math.prod(shape_a[1:]), out_features=shape_b[0],
                   key_a=key_a, key_b=key_b, kind="conv" if conv else "linear",
                   kernel=tuple(shape_a) if conv else None, **fields)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kernel"] = list(self.kernel) if self.kernel else None
        data["extra_keys"] = list(self.extra_keys)
        if data["key_bias"] is None:  # records stay as they were for adapters without a LoRA bias
            del data["key_bias"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModuleSpec:
        data = dict(data)
        data["kernel"] = tuple(data["kernel"]) if data.get("kernel") else None
        data["extra_keys"] = tuple(data.get("extra_keys") or ())
        return cls(**data)


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor of a PEFT adapter that is no LoRA factor: it replaces part of the base model's weights.

    ``feature`` is "modules_to_save" (a whole module trained and saved: a classifier, an lm_head),
    "bias" (a base module's bias trained with ``bias="all"`` / ``"lora_only"``) or "trainable_tokens"
    (rows ``indices`` of an embedding, PEFT's ``trainable_token_indices``). The model's tensor
    ``module``.``param`` (module named as in the adapter) takes the value of the file's ``key``, or for
    trainable tokens its rows ``indices`` do. :mod:`loramgr.formats.extras` reads them.
    """

    feature: str
    module: str
    param: str
    key: str
    shape: tuple[int, ...]
    indices: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["indices"] = list(self.indices) if self.indices is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtraTensor:
        indices = data.get("indices")
        return cls(feature=data["feature"], module=data["module"], param=data["param"], key=data["key"],
                   shape=tuple(data["shape"]), indices=tuple(indices) if indices is not None else None)


@dataclass
class AdapterInfo:
    """Everything loramgr reads from an adapter's files, without keeping any tensor."""

    format: str  # "peft" | "kohya" | "diffusers"
    adapter_type: str  # one of ADAPTER_TYPES
    modules: list[ModuleSpec]
    weights_file: str  # file name of the weights inside the adapter, e.g. adapter_model.safetensors
    config: dict[str, Any] = field(default_factory=dict)  # PEFT adapter_config.json as read
    rank: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] = field(default_factory=list)  # as configured (a regex string kept as one item)
    target_modules_found: list[str] = field(default_factory=list)  # leaf module names seen in tensor keys
    base_model: str | None = None
    base_model_revision: str | None = None
    task_type: str | None = None
    dtypes: list[str] = field(default_factory=list)
    n_params: int = 0
    file_metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    card: dict[str, Any] = field(default_factory=dict)  # license, description, tags from README.md
    notes: list[str] = field(default_factory=list)  # disagreements found while reading, shown to the user
    init_method: str | None = None  # PEFT init_lora_weights naming a method (pissa, olora, eva...): formats/initmethods
    #: saved modules, trained biases and token rows (PEFT adapters); None for a record stored before
    #: loramgr read them, whose config then says what the weights may hold
    extras: list[ExtraTensor] | None = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules}

    def module(self, name: str) -> ModuleSpec:
        for spec in self.modules:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_record(self) -> dict[str, Any]:
        """Everything needed to rebuild this AdapterInfo (stored in the registry's ``info`` column)."""
        record = self.summary()
        record["weights_file"] = self.weights_file
        record["config"] = self.config
        record["modules"] = [m.to_dict() for m in self.modules]
        if self.extras is not None:
            record["extras"] = [e.to_dict() for e in self.extras]
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> AdapterInfo:
        return cls(
            format=record["format"],
            adapter_type=record["adapter_type"],
            modules=[ModuleSpec.from_dict(m) for m in record["modules"]],
            weights_file=record["weights_file"],
            config=record.get("config") or {},
            rank=record.get("rank"),
            alpha=record.get("alpha"),
            use_rslora=bool(record.get("use_rslora")),
            use_dora=bool(record.get("use_dora")),
            target_modules=list(record.get("target_modules") or []),
            target_modules_found=list(record.get("target_modules_found") or []),
            base_model=record.get("base_model"),
            base_model_revision=record.get("base_model_revision"),
            task_type=record.get("task_type"),
            dtypes=list(record.get("dtypes") or []),
            n_params=int(record.get("n_params") or 0),
            file_metadata=dict(record.get("file_metadata") or {}),
            card=dict(record.get("card") or {}),
            notes=list(record.get("notes") or []),
            init_method=record.get("init_method"),
            extras=[ExtraTensor.from_dict(e) for e in record["extras"]] if "extras" in record else None,
        )

    def summary(self) -> dict[str, Any]:
        """The JSON-able metadata that the registry stores and ``show --json`` prints."""
        ranks = sorted({m.rank for m in self.modules})
        return {
            "format": self.format,
            "adapter_type": self.adapter_type,
            "rank": self.rank,
            "ranks_found": ranks,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "rank_pattern": self.config.get("rank_pattern") or {},
            "alpha_pattern": self.config.get("alpha_pattern") or {},
            "target_modules": self.target_modules,
            "target_modules_found": self.target_modules_found,
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "task_type": self.task_type,
            "n_modules": len(self.modules),
            "n_params": self.n_params,
            "dtypes": self.dtypes,
            "file_metadata": self.file_metadata,
            "card": self.card,
            "notes": self.notes,
            "init_method": self.init_method,
        }



def with_largest_rank(info: AdapterInfo) -> AdapterInfo:
    """``info`` with ``rank`` the largest module rank, the number a server's rank limit (vLLM's
    ``--max-lora-rank``) is compared with; PEFT's declared ``r`` stays in ``info.config``."""
    import dataclasses

    largest = max((m.rank for m in info.modules), default=None)
    return info if largest is None or largest == info.rank else dataclasses.replace(info, rank=largest)

class LoraAdapter:
    """An adapter's description plus lazy access to its factors, one module at a time.

    ``folder`` holds ``info.weights_file`` (or ``weights_path`` names the file directly, as for a blob in
    the store); tensors are read with safetensors' ``safe_open`` only when asked for, so a merge of many
    adapters holds one module's factors at a time. ``digest`` is the registry digest when it came from
    the registry.
    """

    def __init__(
        self,
        info: AdapterInfo,
        folder: str | Path,
        *,
        label: str | None = None,
        weights_path: str | Path | None = None,
        digest: str | None = None,
    ) -> None:
        self.info = info
        self.folder = Path(folder)
        self.label = label or str(folder)
        self.digest = digest
        self._weights_path = Path(weights_path) if weights_path else None
        self._specs = {m.name: m for m in info.modules}

    @property
    def weights_path(self) -> Path:
        return self._weights_path or self.folder / self.info.weights_file

    @property
    def module_names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> ModuleSpec:
        return self._specs[name]

    def factors(self, name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module as 2-D tensors (A: rank x in, B: out x rank), optionally cast."""
        from safetensors import safe_open

        spec = self._specs[name]
        with safe_open(str(self.weights_path), framework="pt") as handle:
            a = handle.get_tensor(spec.key_a)
            b = handle.get_tensor(spec.key_b)
        a = a.reshape(a.shape[0], -1)
        b = b.reshape(b.shape[0], -1)
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return a, b

    def open_weights(self) -> TensorFile:
        """The weights file opened for reading numpy arrays (no torch), as a context manager: what a
        merge reads each module's factors from, opening each source once."""
        from .merge.tensorfile import TensorFile

        return TensorFile(self.weights_path)

    def array_factors(
        self, name: str, weights: TensorFile | None = None
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(A, B) of one module as 2-D float32 numpy arrays (A: rank x in, B: out x rank), read from
        ``weights`` (an open :meth:`open_weights`) or, without it, from the file opened for this call."""
        if weights is None:
            with self.open_weights() as opened:
                return self.array_factors(name, opened)
        spec = self._specs[name]
        a, b = weights.array(spec.key_a), weights.array(spec.key_b)
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def delta(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = scale · B · A of one module (out x in, convolutions flattened)."""
        import torch

        a, b = self.factors(name, dtype or torch.float32)
        return self._specs[name].scale * (b @ a)

"""The result of a merge: PEFT config, tensors, per-module report, deterministic saving.

Every output module has its scale baked into B (alpha == rank, scale 1), so the written config needs
no rsLoRA and no per-module alpha arithmetic: ``r`` is the most common rank and every other module
gets an entry in ``rank_pattern`` and ``alpha_pattern``, written by
:func:`loramgr.formats.peftconfig.lora_config` with keys that match that one module only."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from loramgr.adapter import AdapterInfo, ModuleSpec
from loramgr.fileio import write_atomic, write_atomic_with
from loramgr.formats.peftconfig import lora_config
from loramgr.formats.peftconfig import pattern_key as pattern_key  # re-exported: merge callers import it from here
from loramgr.merge.options import MergeOptions
from loramgr.merge.recipes import Recipe
from loramgr.merge.tensorfile import write_safetensors

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: the safetensors metadata of a merge result (what PEFT's save_pretrained writes)
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class ModuleReport:
    """What happened to one module: its rank, the kept energy, which sources had it."""

    name: str
    rank: int
    kept_energy: float  # fraction of ||Σ w_i ΔW_i||_F^2 (or of the element-wise result) kept; 1.0 = exact
    sources: tuple[str, ...]  # labels of the adapters that target this module
    missing_in: tuple[str, ...]  # labels of the adapters that do not (counted as zero there)
    in_features: int = 0
    out_features: int = 0
    kind: str = "linear"
    kernel: tuple[int, ...] | None = None  # conv: the source's A shape (rank, in, kh, kw)


@dataclass(frozen=True)
class OutputModule:
    """Layout facts of a source module that the output must reproduce (kind, conv kernel)."""

    name: str
    in_features: int
    out_features: int
    kind: str
    kernel: tuple[int, ...] | None


Array = NDArray[Any]


def tensor_keys(module: str, kind: str) -> tuple[str, str]:
    if kind == "embedding":
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def shape_factors(a: Array, b: Array, layout: OutputModule) -> tuple[Array, Array]:
    """Give flattened conv factors back their kernel shape (A: r x in x kh x kw, B: out x r x 1 x 1)."""
    if layout.kind == "conv" and layout.kernel:
        rank = a.shape[0]
        a = a.reshape(rank, *layout.kernel[1:])
        b = b.reshape(b.shape[0], rank, *([1] * (len(layout.kernel) - 2)))
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def build_config(
    ranks: dict[str, int],
    *,
    base_model: str | None,
    revision: str | None,
    task_type: str | None,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """A PEFT LoRA adapter_config.json for modules of scale 1 with the given ranks."""
    return lora_config(
        {name: (rank, float(rank)) for name, rank in ranks.items()},
        base_model=base_model,
        revision=revision,
        task_type=task_type,
        fan_in_fan_out=fan_in_fan_out,
    )


@dataclass
class MergedAdapter:
    """A merged (or compressed) adapter: held in memory (``arrays``), or already written module by
    module to the safetensors file ``weights_path`` (a merge into a folder or the registry)."""

    config: dict[str, Any]
    #: the tensors by key, each holding exactly the values of ``dtype`` (bfloat16 values in float32
    #: arrays: numpy has no bfloat16); empty when the merge was written straight to ``weights_path``
    arrays: dict[str, Array]
    modules: list[ModuleReport]
    #: the dtype of the tensors: float32, float16, bfloat16 or float64
    dtype: str
    #: how it was made: its sources by reference and digest, with their weights, and the options
    recipe: Recipe = field(repr=False, compare=False)
    weights_path: Path | None = None

    @property
    def options(self) -> MergeOptions:
        """The options as applied (weights filled in, DARE's seed fixed)."""
        return self.recipe.options

    @property
    def sources(self) -> list[str]:
        """Labels of the input adapters, in order."""
        return [source.ref for source in self.recipe.sources]

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The tensors as torch tensors of ``dtype`` (imports torch): the state dict PEFT would load,
        so a merge result can be applied to a model without being saved. Read from ``weights_path``
        when the merge was written there."""
        import torch

        if not self.arrays and self.weights_path is not None:
            from safetensors.torch import load_file

            return load_file(str(self.weights_path))
        dtype = getattr(torch, self.dtype)
        return {key: torch.from_numpy(np.array(array)).to(dtype) for key, array in self.arrays.items()}

    @property
    def kept_energy(self) -> float:
        """The smallest kept energy over modules (1.0 when every module is exact)."""
        return min((m.kept_energy for m in self.modules), default=1.0)

    def info(self) -> AdapterInfo:
        """The result in the shared data model, as read_peft_folder would describe the saved folder."""
        specs = []
        for report in self.modules:
            key_a, key_b = tensor_keys(report.name, report.kind)
            specs.append(
                ModuleSpec(
                    name=report.name,
                    rank=report.rank,
                    alpha=float(report.rank),
                    in_features=report.in_features,
                    out_features=report.out_features,
                    key_a=key_a,
                    key_b=key_b,
                    dtype=self.dtype,
                    kind=report.kind,
                    kernel=(report.rank, *report.kernel[1:]) if report.kind == "conv" and report.kernel else None,
                )
            )
        specs.sort(key=lambda s: s.name)
        return AdapterInfo(
            format="peft",
            adapter_type="lora",
            modules=specs,
            weights_file=WEIGHTS_NAME,
            config=dict(self.config),
            rank=int(self.config["r"]),
            alpha=float(self.config["lora_alpha"]),
            target_modules=list(self.config["target_modules"]),
            target_modules_found=sorted({s.name.rsplit(".", 1)[-1] for s in specs}),  # as read from a folder
            base_model=self.config.get("base_model_name_or_path"),
            base_model_revision=self.config.get("revision"),
            task_type=self.config.get("task_type"),
            dtypes=[self.dtype],
            n_params=sum(r.rank * (r.in_features + r.out_features) for r in self.modules),
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write adapter_config.json and adapter_model.safetensors into ``folder``.

        Deterministic: sorted keys, fixed safetensors metadata, no timestamps, so the same inputs give
        byte-identical files (the registry's digests then identify a merge). Each file is written to a
        temporary file in the folder and moved into place, so a reader never sees half a file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = folder / WEIGHTS_NAME
        if self.arrays or self.weights_path is None:
            write_atomic_with(weights, lambda tmp: write_safetensors(tmp, self.arrays, self.dtype, METADATA))
        elif self.weights_path.resolve() != weights.resolve():
            write_atomic_with(weights, lambda tmp: shutil.copyfile(self.weights_path or "", tmp))
        config = json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        write_atomic(folder / CONFIG_NAME, config.encode())
        return folder

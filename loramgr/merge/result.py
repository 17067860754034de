"""The result of a merge: PEFT config, tensors, per-module report, deterministic saving.

Every output module has its scale baked into B (alpha == rank, scale 1), so the written config needs
no rsLoRA and no per-module alpha arithmetic: ``r`` is the most common rank and every other module
gets an entry in ``rank_pattern`` and ``alpha_pattern``, written by
:func:`loramgr.formats.peftconfig.lora_config` with keys that match that one module only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loramgr.adapter import AdapterInfo, ModuleSpec
from loramgr.fileio import write_atomic, write_atomic_with
from loramgr.formats.peftconfig import lora_config, one_model_names
from loramgr.formats.peftconfig import pattern_key as pattern_key  # re-exported: merge callers import it from here
from loramgr.merge.options import MergeOptions
from loramgr.merge.recipes import Recipe

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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


@dataclass(frozen=True)
class OutputModule:
    """Layout facts of a source module that the output must reproduce (kind, conv kernel)."""

    name: str
    in_features: int
    out_features: int
    kind: str
    kernel: tuple[int, ...] | None


def tensor_keys(module: str, kind: str) -> tuple[str, str]:
    if kind == "embedding":
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def shape_factors(
    a: torch.Tensor, b: torch.Tensor, layout: OutputModule
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give flattened conv factors back their kernel shape (A: r x in x kh x kw, B: out x r x 1 x 1)."""
    if layout.kind == "conv" and layout.kernel:
        rank = a.shape[0]
        a = a.reshape(rank, *layout.kernel[1:])
        b = b.reshape(b.shape[0], rank, *([1] * (len(layout.kernel) - 2)))
    return a.contiguous(), b.contiguous()


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
    """A merged (or compressed) adapter held in memory, ready to save as a PEFT folder."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    modules: list[ModuleReport]
    #: how it was made: its sources by reference and digest, with their weights, and the options
    recipe: Recipe = field(repr=False, compare=False)

    @property
    def options(self) -> MergeOptions:
        """The options as applied (weights filled in, DARE's seed fixed)."""
        return self.recipe.options

    @property
    def sources(self) -> list[str]:
        """Labels of the input adapters, in order."""
        return [source.ref for source in self.recipe.sources]

    @property
    def dtype(self) -> str:
        first = next(iter(self.tensors.values()))
        return str(first.dtype).removeprefix("torch.")

    @property
    def kept_energy(self) -> float:
        """The smallest kept energy over modules (1.0 when every module is exact)."""
        return min((m.kept_energy for m in self.modules), default=1.0)

    def info(self) -> AdapterInfo:
        """The result in the shared data model, as read_peft_folder would describe the saved folder."""
        specs = []
        for report in self.modules:
            key_a, key_b = tensor_keys(report.name, report.kind)
            a = self.tensors[key_a]
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
                    kernel=tuple(a.shape) if report.kind == "conv" else None,
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
            n_params=sum(t.numel() for t in self.tensors.values()),
        )

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write adapter_config.json and adapter_model.safetensors into ``folder``.

        Deterministic: sorted keys, fixed safetensors metadata, no timestamps, so the same inputs give
        byte-identical files (the registry's digests then identify a merge). Each file is written to a
        temporary file in the folder and moved into place, so a reader never sees half a file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {key: self.tensors[key].contiguous() for key in sorted(self.tensors)}
        save_weights(folder / WEIGHTS_NAME, tensors)
        config = json.dumps(self.config, indent=2, sort_keys=True) + "\n"
        write_atomic(folder / CONFIG_NAME, config.encode())
        return folder


def for_one_model(merged: MergedAdapter, sources: list[AdapterInfo]) -> MergedAdapter:
    """``merged`` with its modules named as paths of the one model its PEFT folder is loaded into
    (:func:`loramgr.formats.peftconfig.one_model_names`: a UNet LoRA read from a diffusers or kohya file
    loses the ``unet.`` its sources name it under)."""
    names = one_model_names(sources, [m.name for m in merged.modules])
    if all(name == path for name, path in names.items()):
        return merged
    tensors = dict(merged.tensors)
    modules = []
    for report in merged.modules:
        path = names[report.name]
        for old, new in zip(tensor_keys(report.name, report.kind), tensor_keys(path, report.kind), strict=True):
            tensors[new] = tensors.pop(old)
        modules.append(replace(report, name=path))
    config = merged.config
    rebuilt = build_config({m.name: m.rank for m in modules}, base_model=config.get("base_model_name_or_path"),
                           revision=config.get("revision"), task_type=config.get("task_type"),
                           fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    return replace(merged, config=rebuilt, tensors=tensors, modules=modules)


def save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors file of ``tensors`` with fixed metadata, written atomically and streamed:
    safetensors' ``save_file`` writes each tensor straight from its memory, where ``save`` builds the file
    in memory twice over (for a rank-64 merge of a 7B adapter, 1.2 GB on top of the 610 MB of tensors).
    Same bytes as ``save``."""
    from safetensors.torch import save_file

    write_atomic_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))

"""Turning what a user points ``install`` at into validated adapter files ready to store.

A PEFT folder contributes adapter_config.json, the weights and README.md (other files in a training
run's folder, such as optimizer states or tokenizers, are not part of the adapter and are not stored).
A single .safetensors file is read by the format detector (kohya, diffusers, LyCORIS).
A pickled adapter_model.bin is refused unless ``allow_pickle``; then it is loaded weights-only and
stored converted to safetensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter import AdapterInfo
from ..errors import InvalidAdapterError
from ..formats import peft

if TYPE_CHECKING:
    from ..safetensors_io import SafetensorsHeader

Progress = Callable[[str, int, int], None]


@dataclass
class LocalAdapter:
    info: AdapterInfo
    files: dict[str, Path]  # path inside the adapter -> file on disk to store
    default_name: str


def read_local(path: Path, *, allow_pickle: bool, scratch: Path, progress: Progress | None = None,
               links_into: Path | None = None) -> LocalAdapter:
    """Validate an adapter on disk (metadata, shapes, tensor values) without storing anything.

    A file of an adapter folder that is a link resolving outside the folder is refused (a README.md
    pointing at /etc/passwd would otherwise be stored and exported), except into ``links_into``:
    a Hub snapshot's files are links into its repository's cache folder.
    """
    if not path.exists():
        raise InvalidAdapterError(f"{path}: no such file or folder", path=str(path), hint="check the path")
    if path.is_file():
        return _read_single_file(path, progress)
    for name in (peft.CONFIG_NAME, peft.WEIGHTS_NAME, peft.PICKLE_NAME, peft.CARD_NAME):
        _refuse_escaping_link(path, path / name, links_into)
    files: dict[str, Path] = {}
    weights = path / peft.WEIGHTS_NAME
    if not weights.is_file() and (path / peft.PICKLE_NAME).is_file() and allow_pickle:
        if not (path / peft.CONFIG_NAME).is_file():
            peft.read_peft_folder(path)  # raises the missing-config error
        scratch.mkdir(parents=True, exist_ok=True)
        weights = scratch / peft.WEIGHTS_NAME
        with warnings.catch_warnings():  # torch's note on the pickle protocol: loramgr says what matters
            warnings.simplefilter("ignore", UserWarning)
            peft.convert_pickle(path / peft.PICKLE_NAME, weights)
        info = peft.describe(peft.load_config(path), _header(weights), peft.WEIGHTS_NAME)
        info.notes.append(f"converted from {peft.PICKLE_NAME} (loaded weights-only)")
        card = path / peft.CARD_NAME
        if card.is_file():
            info.card = peft.read_card(card)
    else:
        info = peft.read_peft_folder(path)
    peft.check_tensor_values(weights, progress=progress)
    files[peft.CONFIG_NAME] = path / peft.CONFIG_NAME
    files[peft.WEIGHTS_NAME] = weights
    if (path / peft.CARD_NAME).is_file():
        files[peft.CARD_NAME] = path / peft.CARD_NAME
    return LocalAdapter(info, files, path.resolve().name)


def _refuse_escaping_link(folder: Path, file: Path, links_into: Path | None) -> None:
    if not file.is_symlink():
        return
    target = file.resolve()
    inside = [folder.resolve()] + ([links_into.resolve()] if links_into is not None else [])
    if not any(target.is_relative_to(root) for root in inside):
        raise InvalidAdapterError(
            f"{file}: a link to {target}, outside the adapter folder", path=str(file),
            hint="copy the file into the folder if it belongs to the adapter",
        )


def _header(path: Path) -> SafetensorsHeader:
    from ..safetensors_io import read_header

    return read_header(path)


def _read_single_file(path: Path, progress: Progress | None) -> LocalAdapter:
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise InvalidAdapterError(
            f"{path}: a pickled file can run code when loaded",
            path=str(path),
            hint="convert it to .safetensors, or install its PEFT folder with --allow-pickle",
        )
    if path.suffix != ".safetensors":
        raise InvalidAdapterError(
            f"{path}: not an adapter file", path=str(path), hint="point at a PEFT folder or a .safetensors file"
        )
    if path.name == peft.WEIGHTS_NAME and (path.parent / peft.CONFIG_NAME).is_file():
        return read_local(path.parent, allow_pickle=False, scratch=path.parent, progress=progress)
    from ..formats.detect import read_adapter_file

    info = read_adapter_file(path)
    peft.check_tensor_values(path, progress=progress)
    return LocalAdapter(info, {path.name: path}, path.stem)

"""Base-model identity: fingerprints read from safetensors headers, and the module shapes checks need.

Three levels, each cheaper to get than the next is to trust:

- declared: the name and revision a config or the user gives (breaks on renames and local paths);
- structural: sha256 of the sorted (tensor name, shape) list, read from the safetensors *headers only*
  (a few KB per file, whatever the checkpoint's size). A different structural fingerprint means an
  adapter made for one model cannot apply to the other. ``structural_dtypes`` adds the dtypes, to tell
  a bf16 copy from an fp32 one;
- content: sha256 of every weight file. This reads every byte (minutes for a 7B model), so it is a
  separate, optional step (:func:`add_content_digests`); a difference means another fine-tune of the
  same architecture.

Canonical encoding of the structural hash: one line per tensor, sorted by name,
``name<TAB>d0,d1,...`` (``name<TAB>d0,...<TAB>DTYPE`` for the dtype variant), joined by "\\n", UTF-8.
Tensor order in the files, the sharding and the ``__metadata__`` do not enter it.

Sharded checkpoints are read through ``*.safetensors.index.json``; diffusers pipeline folders
(``model_index.json``) are read component by component with names prefixed "unet.", "text_encoder."
so that they match diffusers adapter module names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidBaseModelError
from ..safetensors_io import read_header

Progress = Callable[[str, int, int], None]

#: torch dtype name -> safetensors dtype name, for fingerprints built from a live model
_SAFETENSORS_DTYPES = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int8": "I8", "uint8": "U8",
    "int16": "I16", "int32": "I32", "int64": "I64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip
_SIZE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "n_embd", "n_layer", "n_head",
)  # fmt: skip
_EMBEDDING_LEAVES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_embedding",
                     "position_embedding", "shared", "embed_positions", "token_type_embeddings")


@dataclass
class BaseFingerprint:
    """What loramgr knows about a base model without loading it. JSON-able via to_dict/from_dict."""

    structural: str  # "sha256:<hex>" of the (name, shape) list
    structural_dtypes: str  # the same with dtypes
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype)
    name: str | None = None  # declared name (config _name_or_path, or given)
    revision: str | None = None
    architecture: str | None = None  # config.json architectures[0] / model_index.json _class_name
    model_type: str | None = None
    sizes: dict[str, int] = field(default_factory=dict)  # hidden_size, num_hidden_layers, ...
    files: dict[str, int] = field(default_factory=dict)  # weight file (relative) -> bytes
    content_digests: dict[str, str] | None = None  # weight file -> "sha256:<hex>", when computed
    source: str | None = None  # the path it was read from
    #: module path of the model transformers builds -> the checkpoint module whose weight it loads under
    #: another name (legacy keys transformers renames on loading); see :func:`transformers_aliases`
    renamed: dict[str, str] = field(default_factory=dict)
    #: module path of the model transformers builds -> the checkpoint module it shares its weight with
    tied: dict[str, str] = field(default_factory=dict)
    #: parameters of 3 or more dimensions that are no module's weight (fused MoE experts, ``mlp.experts.gate_up_proj``)
    #: in the model transformers builds -> their shape; what PEFT's ``target_parameters`` adapt
    parameters: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def content(self) -> str | None:
        """One digest over all weight files' digests (None until content digests are computed)."""
        if self.content_digests is None:
            return None
        lines = "\n".join(f"{name}\t{digest}" for name, digest in sorted(self.content_digests.items()))
        return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()

    @property
    def n_params(self) -> int:
        total = 0
        for shape, _ in self.tensors.values():
            count = 1
            for d in shape:
                count *= d
            total += count
        return total

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tensors"] = {k: [list(shape), dtype] for k, (shape, dtype) in self.tensors.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaseFingerprint:
        data = dict(data)
        data["tensors"] = {k: (tuple(shape), dtype) for k, (shape, dtype) in data["tensors"].items()}
        return cls(**data)


@dataclass(frozen=True)
class ModuleShape:
    """A Linear / Conv / Embedding module of the base: the weight shape an adapter must fit."""

    kind: str  # "linear" | "conv" | "embedding"
    out_features: int
    in_features: int  # convolutions: in · kh · kw, as adapters flatten A
    shape: tuple[int, ...]


def structural_hash(tensors: Mapping[str, tuple[tuple[int, ...], str]], *, dtypes: bool = False) -> str:
    """The canonical structural digest (see the module docstring for the encoding)."""
    digest = hashlib.sha256()
    for i, name in enumerate(sorted(tensors)):
        shape, dtype = tensors[name]
        line = f"{name}\t{','.join(str(d) for d in shape)}" + (f"\t{dtype}" if dtypes else "")
        digest.update((("\n" if i else "") + line).encode())
    return "sha256:" + digest.hexdigest()


def fingerprint_from_tensors(
    tensors: Mapping[str, tuple[tuple[int, ...], str]], *, name: str | None = None, **fields: Any
) -> BaseFingerprint:
    """A fingerprint from a {tensor name: (shape, safetensors dtype)} mapping."""
    tensors = {k: (tuple(int(d) for d in s), dt) for k, (s, dt) in tensors.items()}
    return BaseFingerprint(
        structural=structural_hash(tensors),
        structural_dtypes=structural_hash(tensors, dtypes=True),
        tensors=tensors,
        name=name,
        **fields,
    )


def fingerprint_from_state_dict(model_or_state_dict: Any, *, name: str | None = None) -> BaseFingerprint:
    """A fingerprint of a live torch model (or state dict), equal to the one of its saved safetensors.

    Uses shapes and dtypes only; tied weights appear once per name, as in ``state_dict()``.
    """
    state = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    tensors = {}
    for key, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        tensors[key] = (tuple(tensor.shape), _SAFETENSORS_DTYPES.get(dtype, dtype.upper()))
    return fingerprint_from_tensors(tensors, name=name)


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of one model folder: the index's shards, else every non-variant *.safetensors."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        shards: set[str] = set()
        for index in indexes:
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidBaseModelError(
                    f"{index}: not a valid safetensors index (no weight_map)", path=str(index)
                ) from exc
            shards.update(weight_map.values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise InvalidBaseModelError(
                f"{folder}: shard {missing[0]} named in the index is missing ({len(missing)} missing)",
                path=str(folder / missing[0]),
                hint="download the complete checkpoint",
            )
        return [folder / s for s in sorted(shards)]
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.name.removesuffix(".safetensors")]
    return plain or files  # "model.fp16.safetensors" is a variant of "model.safetensors"


def _collect(path: Path) -> list[tuple[str, Path]]:
    """(name prefix, weight file) pairs for a file, a model folder or a diffusers pipeline folder."""
    if path.is_file():
        return [("", path)]
    if not path.is_dir():
        raise InvalidBaseModelError(
            f"{path}: no such file or folder", path=str(path), hint="pass a base model folder or .safetensors file"
        )
    if (path / "model_index.json").is_file():
        pairs = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            pairs += [(f"{sub.name}.", f) for f in _weight_files(sub)]
        return pairs
    return [("", f) for f in _weight_files(path)]


def _read_config(path: Path) -> dict[str, Any]:
    folder = path if path.is_dir() else path.parent
    for name in ("config.json", "model_index.json"):
        candidate = folder / name
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InvalidBaseModelError(f"{candidate}: broken JSON ({exc.msg})", path=str(candidate)) from exc
            return data if isinstance(data, dict) else {}
    return {}


def fingerprint_base_model(
    path: str | Path,
    *,
    name: str | None = None,
    revision: str | None = None,
    content: bool = False,
    progress: Progress | None = None,
) -> BaseFingerprint:
    """Fingerprint a base model (file, folder, sharded or diffusers pipeline) from headers only.

    ``content=True`` also hashes every weight file (reads all bytes); see :func:`add_content_digests`.
    """
    path = Path(path)
    pairs = _collect(path)
    if not pairs:
        raise InvalidBaseModelError(
            f"{path}: no .safetensors weight files found", path=str(path), hint="pass a safetensors checkpoint"
        )
    root = path if path.is_dir() else path.parent
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    files: dict[str, int] = {}
    for i, (prefix, file) in enumerate(pairs):
        header = read_header(file)
        files[file.relative_to(root).as_posix()] = header.file_size
        for key, entry in header.tensors.items():
            full = prefix + key
            if full in tensors:
                raise InvalidBaseModelError(
                    f"{file}: tensor {full} also appears in another weight file", path=str(file), tensor=full
                )
            tensors[full] = (entry.shape, entry.dtype)
        if progress:
            progress("reading headers", i + 1, len(pairs))
    config = _read_config(path)
    architectures = config.get("architectures") or []
    fingerprint = fingerprint_from_tensors(
        tensors,
        name=name or config.get("_name_or_path") or None,
        revision=revision,
        architecture=(architectures[0] if architectures else None) or config.get("_class_name"),
        model_type=config.get("model_type"),
        sizes={k: config[k] for k in _SIZE_KEYS if isinstance(config.get(k), int)},
        files=files,
        source=str(path.resolve()),
        **transformers_aliases(path, config, tensors),
    )
    if content:
        add_content_digests(fingerprint, progress=progress)
    return fingerprint


def transformers_aliases(
    path: Path, config: Mapping[str, Any], tensors: Mapping[str, tuple[tuple[int, ...], str]]
) -> dict[str, Any]:
    """What the model transformers builds from this checkpoint has that the checkpoint's keys do not spell out:
    ``renamed`` and ``tied`` (module path -> the checkpoint module it loads) and ``parameters`` (shapes).

    Two ways a module PEFT wraps has no weight of its own name in the checkpoint: transformers 5 renames
    legacy keys when it loads them (a ViT checkpoint's ``vit.encoder.layer.0.attention.attention.query`` is
    the model's ``vit.layers.0.attention.q_proj``), and a tied weight is saved once (Gemma's ``lm_head`` is
    ``model.embed_tokens``). Fused expert parameters (Mixtral's ``mlp.experts.gate_up_proj``, built from the
    checkpoint's per-expert ``w1`` / ``w3``), which PEFT's ``target_parameters`` adapt, are recorded with
    their shapes. All are read from transformers itself: the model is built on the meta device from
    config.json (no weights, no memory), each checkpoint key goes through the renamings transformers applies
    when loading, and modules that share a parameter share a checkpoint module.

    A renamed checkpoint name is no module of the model, so PEFT cannot load an adapter that names it:
    :func:`module_shapes` replaces it by the model's name. A folder transformers cannot build (no
    ``architectures``, a class it lacks, custom code, transformers not installed) gets none of these: the
    checkpoint's own names are all there is to check against.
    """
    architectures = config.get("architectures")
    if not path.is_dir() or not isinstance(architectures, list) or not architectures or "model_type" not in config:
        return {"renamed": {}, "tied": {}, "parameters": {}}
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return {"renamed": {}, "tied": {}, "parameters": {}}
    model_class = getattr(transformers, str(architectures[0]), None)
    if model_class is None or not hasattr(model_class, "config_class"):
        return {"renamed": {}, "tied": {}, "parameters": {}}
    try:
        model_config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            model = model_class(model_config)
        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - any config transformers cannot build leaves the checkpoint's names
        return {"renamed": {}, "tied": {}, "parameters": {}}
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    live = dict(model.state_dict(keep_vars=True))
    loaded: dict[str, str] = {}  # model weight key -> checkpoint weight key
    for key in tensors:
        if not key.endswith(".weight"):
            continue
        new_key, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, live)
        if converted is None and new_key in live:  # a converter fuses or splits tensors: no one-to-one module
            loaded.setdefault(new_key, key)
    owners: dict[int, str] = {id(param): k for k, param in live.items() if k in loaded}
    renamed: dict[str, str] = {}
    tied: dict[str, str] = {}
    for key, param in live.items():
        if not key.endswith(".weight") or param.dim() < 2:
            continue
        module = key.removesuffix(".weight")
        if key in loaded and loaded[key] != key:
            renamed[module] = loaded[key].removesuffix(".weight")
        elif key not in loaded and id(param) in owners:
            tied[module] = owners[id(param)].removesuffix(".weight")
    parameters = {k: tuple(p.shape) for k, p in live.items() if p.dim() >= 3 and not k.endswith(".weight")}
    return {"renamed": renamed, "tied": tied, "parameters": parameters}


def add_content_digests(
    fingerprint: BaseFingerprint, root: str | Path | None = None, *, progress: Progress | None = None
) -> BaseFingerprint:
    """Hash every weight file (sha256 of all its bytes) into ``fingerprint.content_digests``.

    This is the expensive level: it reads the whole checkpoint once, streaming 8 MiB at a time.
    """
    base = Path(root or fingerprint.source or ".")
    base = base if base.is_dir() else base.parent
    total = sum(fingerprint.files.values()) or 1
    done = 0
    digests: dict[str, str] = {}
    for rel in sorted(fingerprint.files):
        digest = hashlib.sha256()
        with open(base / rel, "rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress("hashing", done, total)
        digests[rel] = "sha256:" + digest.hexdigest()
    fingerprint.content_digests = digests
    return fingerprint


def module_shapes(fingerprint: BaseFingerprint) -> dict[str, ModuleShape]:
    """Each weight-bearing module (``<path>.weight`` of 2-D or more) with the shape an adapter must fit.

    2-D weights are Linear (or Embedding, told by the usual embedding names); 3-D and 4-D are
    convolutions, flattened like adapter factors. 1-D weights (norms) take no LoRA and are left out.
    Modules go by the names transformers gives them: a renamed checkpoint key by its new name, and a tied
    module (``lm_head``) is there with the shape of the weight it shares.
    """
    shapes: dict[str, ModuleShape] = {}
    for key, (shape, _) in fingerprint.tensors.items():
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        module = key[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        if len(shape) == 2:
            kind = "embedding" if leaf in _EMBEDDING_LEAVES else "linear"
            shapes[module] = ModuleShape(kind, shape[0], shape[1], tuple(shape))
        else:
            in_features = 1
            for d in shape[1:]:
                in_features *= d
            shapes[module] = ModuleShape("conv", shape[0], in_features, tuple(shape))
    for table, replaces in ((fingerprint.renamed, True), (fingerprint.tied, False)):
        for alias, module in table.items():
            found = shapes.pop(module, None) if replaces else shapes.get(module)
            if found is None:
                continue
            leaf = alias.rsplit(".", 1)[-1]
            kind = found.kind if found.kind == "conv" else "embedding" if leaf in _EMBEDDING_LEAVES else "linear"
            shapes[alias] = ModuleShape(kind, found.out_features, found.in_features, found.shape)
    return shapes

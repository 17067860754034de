"""An adapter's saved modules, trained biases, LoRA biases and token rows against a model: check, fuse, unfuse.

What PEFT's ``merge_and_unload`` leaves in the model, :func:`fuse_extras` writes: each saved module's
tensors and each trained bias replace the model's, the trainable token rows replace the embedding's
rows, and a LoRA bias adds scale · lora_B.bias to the layer's bias (after any replacement, as PEFT
loads the trained bias first). Replacing is no sum that can be subtracted again, so fuse keeps the
tensors it overwrites on the model (only the rows, for an embedding) and unfuse puts them back bit for
bit; without them (another process fused, or the model was reloaded) unfuse refuses instead of
guessing. A fused adapter stays fused once: a second fuse of it, or of another adapter replacing the
same tensor, is refused until the first is unfused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..adapter import ExtraTensor, LoraAdapter
from ..errors import ConflictError, UnsupportedFeatureError
from ..formats.extras import FEATURE_NAMES, features

if TYPE_CHECKING:
    import torch

    from .weights import Mismatch

#: attribute of a model holding, per fused adapter, the tensors its fuse replaced
ORIGINALS = "_loramgr_replaced"
SCALE = ""  # the key, among an adapter's replaced tensors' names, of the scale it was fused at


def read_tensor(lora: LoraAdapter, key: str) -> torch.Tensor:
    """One tensor of the adapter by its key: from memory for an in-memory adapter, else its weights file."""
    held = getattr(lora, "_tensors", None)
    if held is not None:
        found: torch.Tensor = held[key]
        return found
    from safetensors import safe_open

    with safe_open(str(lora.weights_path), framework="pt") as handle:
        read: torch.Tensor = handle.get_tensor(key)
    return read


def _target(model: torch.nn.Module, path: str, param: str) -> torch.Tensor | None:
    """The model's tensor ``param`` (a parameter or buffer, possibly nested: ``dense.weight``) of ``path``."""
    import torch

    from .weights import base_layer

    owner: Any = base_layer(model.get_submodule(path))
    *parents, leaf = param.split(".")
    for part in parents:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    found = getattr(owner, leaf, None)
    return found if isinstance(found, torch.Tensor) else None


def resolve_extras(
    model: torch.nn.Module, lora: LoraAdapter, mapping: dict[str, str]
) -> tuple[dict[str, str], list[Mismatch]]:
    """(extra module name -> model path, problems): each saved tensor's module resolves (with the resolver of
    the LoRA modules), has that tensor with the saved shape (token rows: within the embedding), and each
    LoRA module with a LoRA bias has a bias to add it to. ``mapping`` is the LoRA modules' own."""
    from .weights import Mismatch, base_layer, resolve_names

    extras = lora.info.extras or []
    paths, problems = resolve_names(model, sorted({e.module for e in extras}))
    for e in extras:
        path = paths.get(e.module)
        if path is None:
            continue
        found = _target(model, path, e.param)
        what = f"{FEATURE_NAMES[e.feature]} {e.module}.{e.param}"
        if found is None:
            problems.append(Mismatch(e.module, "missing", f"{what}: the model's {path} has no {e.param}"))
        elif e.feature == "trainable_tokens":
            rows = max(e.indices or (0,))
            if found.dim() != 2 or found.shape[1] != e.shape[1] or rows >= found.shape[0]:
                problems.append(Mismatch(e.module, "shape", f"{what}: rows up to {rows} of width {e.shape[1]}, "
                                         f"the model's is {list(found.shape)}"))
        elif tuple(found.shape) != e.shape:
            problems.append(Mismatch(e.module, "shape",
                                     f"{what} is {list(e.shape)}, the model's is {list(found.shape)}"))
    for spec in lora.info.modules:
        path = mapping.get(spec.name) if spec.key_bias else None
        if path is not None and getattr(base_layer(model.get_submodule(path)), "bias", None) is None:
            problems.append(Mismatch(spec.name, "missing", "the adapter has a LoRA bias (lora_bias), "
                                     f"the model's {path} has no bias"))
    return paths, problems


@dataclass(frozen=True)
class _Write:
    """One model tensor an adapter's fuse changes: replaced whole, in rows, or added to (a LoRA bias)."""

    name: str  # the model's path of the tensor, e.g. classifier.weight
    tensor: torch.Tensor
    extra: ExtraTensor | None  # None: a LoRA bias, added
    key: str
    scale: float = 1.0


def prepare(
    model: torch.nn.Module, lora: LoraAdapter, mapping: dict[str, str], factor: float, operation: str,
    *, allow_tied: bool,
) -> Callable[[], None] | None:
    """Check everything the fuse or unfuse of the adapter's extras needs, changing nothing; returns the
    step that makes the change (None when the adapter has no extras). ``factor`` is fuse's scale
    (negative for unfuse)."""
    found = features(lora.info)
    if not found:
        return None
    label = lora.label
    feature, module = found[0]
    if lora.info.extras is None:
        raise UnsupportedFeatureError(
            f"{operation} of {label}: its config asks for {FEATURE_NAMES[feature]} ({module}), which its "
            f"{lora.info.format} description does not hold", feature=feature, module=module, path=label,
            hint="load it with the tool that wrote it")
    replacing = [e for e in lora.info.extras]
    if replacing and abs(factor) != 1.0:
        e = replacing[0]
        raise UnsupportedFeatureError(
            f"{operation} of {label} at scale {abs(factor):g}: {FEATURE_NAMES[e.feature]} {e.module} replaces "
            "the model's tensors, which cannot be scaled", feature=e.feature, module=e.module, path=label,
            hint="fuse it at scale 1, or use apply() and PEFT's set_scale")
    paths, _ = resolve_extras(model, lora, mapping)  # checked_mapping has refused any problem
    writes = [_Write(f"{paths[e.module]}.{e.param}", _target(model, paths[e.module], e.param), e, e.key)  # type: ignore[arg-type]
              for e in replacing]
    from .weights import base_layer

    for spec in lora.info.modules:
        if spec.key_bias:
            bias: torch.Tensor = base_layer(model.get_submodule(mapping[spec.name])).bias  # type: ignore[assignment]
            writes.append(_Write(f"{mapping[spec.name]}.bias", bias, None, spec.key_bias, spec.scale * factor))
    identity = lora.digest or lora.label
    fused: dict[str, dict[str, Any]] = model.__dict__.setdefault(ORIGINALS, {})
    if factor > 0:
        _refuse_overlap(fused, identity, writes, label)
        if not allow_tied:  # PEFT writes token rows into a tied weight too, but replaces a saved module alone
            _refuse_tied(model, [w for w in writes if w.extra is not None and w.extra.feature == "modules_to_save"],
                         label)
        return lambda: _fuse(fused, identity, lora, writes, factor)
    if identity in fused:
        fused_at = fused[identity][SCALE]
        if fused_at != -factor:
            raise ConflictError(f"{label} was fused at scale {fused_at:g}, not {-factor:g}",
                                hint=f"unfuse it at scale {fused_at:g}")
        return lambda: _restore(fused, identity, writes)
    if replacing:
        e = replacing[0]
        raise UnsupportedFeatureError(
            f"unfuse of {label}: {FEATURE_NAMES[e.feature]} {e.module} replaced the model's tensors, and this "
            "model does not hold the originals (fused in another process, or never fused)",
            feature=e.feature, module=e.module, path=label, hint="load the base model again instead")
    return lambda: _add_biases(lora, writes)


def _refuse_overlap(fused: dict[str, dict[str, Any]], identity: str, writes: list[_Write], label: str) -> None:
    if identity in fused:
        raise ConflictError(f"{label} is already fused into this model", hint="unfuse it first")
    for other, originals in fused.items():
        shared = next((w for w in writes if w.name in originals and w.extra is not None), None)
        if shared is not None:
            raise ConflictError(
                f"cannot fuse {label}: {shared.name} was replaced by {other}, which is fused",
                hint=f"unfuse {other} first; two adapters replacing one module cannot both be fused")


def _refuse_tied(model: torch.nn.Module, writes: list[_Write], label: str) -> None:
    from .weights import Mismatch, ModelMismatchError

    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    problems = []
    for w in writes:
        sharing = [n for n in owners.get(id(w.tensor), []) if n != w.name]
        if sharing:
            problems.append(Mismatch(w.name, "tied", f"its tensor is shared with {', '.join(sharing)}"))
    if problems:
        raise ModelMismatchError(label, problems, n_modules=len(writes),
                                 hint="PEFT replaces the saved module alone: untie the weights first (or pass "
                                 "allow_tied=True to change both, which PEFT does not)")


def _fuse(fused: dict[str, dict[str, Any]], identity: str, lora: LoraAdapter, writes: list[_Write],
          factor: float) -> None:
    import torch

    originals: dict[str, Any] = {SCALE: factor}
    for w in writes:
        if w.name not in originals:
            rows = w.extra.indices if w.extra is not None and w.extra.feature == "trainable_tokens" else None
            kept = w.tensor[list(rows)] if rows is not None else w.tensor
            originals[w.name] = (rows, kept.detach().clone())
    with torch.no_grad():
        for w in sorted(writes, key=lambda w: w.extra is None):  # replacements first, then LoRA biases
            value = read_tensor(lora, w.key)
            if w.extra is None:
                w.tensor.copy_((w.tensor.float() + w.scale * value.float()).to(w.tensor.dtype))
            elif w.extra.indices is not None:
                index = torch.tensor(w.extra.indices, device=w.tensor.device)
                w.tensor.index_copy_(0, index, value.to(w.tensor))
            else:
                w.tensor.copy_(value.to(w.tensor))
    fused[identity] = originals


def _restore(fused: dict[str, dict[str, Any]], identity: str, writes: list[_Write]) -> None:
    import torch

    originals = fused.pop(identity)
    del originals[SCALE]
    tensors = {w.name: w.tensor for w in writes}
    with torch.no_grad():
        for name, (rows, kept) in originals.items():
            if rows is None:
                tensors[name].copy_(kept)
            else:
                tensors[name].index_copy_(0, torch.tensor(rows, device=kept.device), kept)


def _add_biases(lora: LoraAdapter, writes: list[_Write]) -> None:
    import torch

    with torch.no_grad():
        for w in writes:
            value = read_tensor(lora, w.key)
            w.tensor.copy_((w.tensor.float() + w.scale * value.float()).to(w.tensor.dtype))

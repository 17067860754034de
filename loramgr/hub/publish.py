"""Publishing a registered version to the Hub: export, render the model card, plan, push and tag."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..registry import Registry
from .client import PushPlan


@contextmanager
def prepare_push(registry: Registry, reference: str, *, repo_id: str, private: bool = False,
                 fmt: str = "peft") -> Iterator[tuple[PushPlan, Path]]:
    """Export ``reference`` to a scratch folder and plan its push; yields (PushPlan, folder).

    The scratch folder lives under the store's ``tmp/`` and holds the shared store lock until the
    ``with`` block ends, so a ``gc`` meanwhile waits instead of deleting what is being uploaded.
    """
    from ..exporter import export_version
    from ..merge.recipes import recipe_toml
    from .client import plan_push
    from .modelcard import render_model_card

    details = registry.show(reference)
    with registry.store.scratch() as scratch:
        folder = scratch / "adapter"
        if fmt == "peft":
            export_version(registry, reference, folder, fmt="peft")
            (folder / "README.md").unlink(missing_ok=True)  # replaced by the generated card
        else:
            folder.mkdir()
            export_version(registry, reference, folder / f"{details.name}.safetensors", fmt=fmt)
        card = render_model_card(
            dataclasses.replace(details, format=fmt) if fmt != "peft" else details,  # the files uploaded
            repo_id=repo_id,
            recipe_toml=recipe_toml(details) if details.recipe else None,
        )
        yield plan_push(folder, repo_id=repo_id, tag=f"v{details.version}", card=card, private=private), folder


def run_push(plan: PushPlan, folder: Path, *, notify: Callable[[str], None] | None = None) -> str:
    from .client import push
    from .install import hub_endpoint

    return push(plan, folder, endpoint=hub_endpoint(), notify=notify)

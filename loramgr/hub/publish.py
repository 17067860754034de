"""Publishing a registered version to the Hub: export, render the model card, plan, push and tag."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..registry import Registry


@contextmanager
def prepare_push(registry: Registry, reference: str, *, repo_id: str, private: bool = False,
                 fmt: str = "peft") -> Iterator[tuple[Any, Path]]:
    """Export ``reference`` to a scratch folder and plan its push; yields (PushPlan, folder)."""
    from ..install import export_any
    from ..merge.recipes import recipe_toml
    from .client import plan_push
    from .modelcard import render_model_card

    shown = registry.show(reference)
    registry.store.tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=registry.store.tmp_dir) as scratch:
        folder = Path(scratch) / "adapter"
        if fmt == "peft":
            export_any(registry, reference, folder, fmt="peft")
            (folder / "README.md").unlink(missing_ok=True)  # replaced by the generated card
        else:
            folder.mkdir()
            export_any(registry, reference, folder / f"{shown['name']}.safetensors", fmt=fmt)
        lineage = None
        if shown.get("parents"):
            lineage = {"method": (shown.get("recipe") or {}).get("method"), "sources": shown["parents"]}
        card = render_model_card(
            {**shown, "format": fmt} if fmt != "peft" else shown,  # the card describes the files uploaded
            name=shown["name"],
            version=shown["version"],
            repo_id=repo_id,
            lineage=lineage,
            recipe_toml=recipe_toml(shown) if shown.get("recipe") else None,
        )
        yield plan_push(folder, repo_id=repo_id, tag=f"v{shown['version']}", card=card, private=private), folder


def run_push(plan: Any, folder: Path, *, notify: Callable[[str], None] | None = None) -> str:
    from .client import push
    from .install import hub_endpoint

    return push(plan, folder, endpoint=hub_endpoint(), notify=notify)

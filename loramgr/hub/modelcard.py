"""Model cards (README.md) of adapters: read the facts loramgr keeps, write the card it pushes.

The Hub indexes a card's YAML block: ``library_name: peft`` puts the adapter under PEFT's filters,
``base_model`` plus the ``base_model:adapter:<id>`` tag links it from the base model's page
(docs/hub.md, "Publishing"). The body is for people: what it is, its ranks, where it came from when it is a
combination of other adapters, and how to load it with PEFT and with loramgr.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..registry import VersionDetails

#: PEFT task_type -> the Hub's pipeline_tag; kohya / diffusers adapters without one are text-to-image
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def parse_card(text: str) -> dict[str, Any]:
    """license / base_model / tags / description from a card's YAML block and first prose paragraph.

    A broken YAML block yields empty metadata instead of an error: a card is documentation, and a
    typo in it must not stop an install.
    """
    meta: dict[str, Any] = {}
    body = text
    if text.startswith("---"):
        end = text.find("\n---", 3)
        if end != -1:
            try:
                import yaml

                loaded = yaml.safe_load(text[3:end])
                meta = loaded if isinstance(loaded, dict) else {}
            except Exception:  # noqa: BLE001 - any YAML failure means "no metadata"
                meta = {}
            body = text[end + 4 :]
    description = None
    for block in re.split(r"\n\s*\n", body):
        block = block.strip()
        if block and not block.startswith(("#", "<!--", "-", "|", "```", "[", "*")) and not _template_text(block):
            description = " ".join(block.split())[:1000]
            break
    tags = meta.get("tags") or []
    tags = [str(t) for t in ([tags] if isinstance(tags, str) else tags)]
    base_model = meta.get("base_model")
    if isinstance(base_model, list):  # the Hub allows a list; the first is the one adapted
        base_model = base_model[0] if base_model else None
    return {
        "license": meta.get("license"),
        "base_model": str(base_model) if base_model else None,
        "tags": [t for t in tags if not _empty_base_model_tag(t)],
        "description": description,
    }


# The prose huggingface_hub's model card template (which PEFT's save_pretrained fills in) writes when
# nothing was given: it describes no adapter, so it is never taken for a description.
_TEMPLATE_PROSE = (
    "Users (both direct and downstream) should be made aware of the risks",
    "Use the code below to get started with the model.",
    "Carbon emissions can be estimated using the [Machine Learning Impact calculator]",
)


def _template_text(block: str) -> bool:
    text = " ".join(block.split())
    return text.startswith(_TEMPLATE_PROSE) or "More Information Needed" in text


def _empty_base_model_tag(tag: str) -> bool:
    """``base_model:adapter:`` with nothing after it: PEFT writes it for a model built from a config."""
    return tag.startswith("base_model:") and tag.endswith(":")


def render_model_card(details: VersionDetails, *, repo_id: str, recipe_toml: str | None = None) -> str:
    """The README.md pushed with an adapter version.

    ``details`` is the version as :meth:`Registry.show <loramgr.registry.core.Registry.show>` gives
    it, with ``format`` set to the format of the files uploaded (rank, alpha, target modules, base
    model, task type, the card read at install time). A combined version's lineage (method and source
    adapters) and ``recipe_toml``, the recipe that rebuilds it, are shown verbatim so a reader can
    reproduce the combination.
    """
    import yaml

    card = details.card
    base_model = details.base_model or card.get("base_model")
    tags = ["lora", "loramgr"]
    if base_model:
        tags.append(f"base_model:adapter:{base_model}")
    tags += [t for t in card.get("tags") or [] if t not in tags and not t.startswith("base_model:adapter:")]
    meta: dict[str, Any] = {"library_name": "peft"}
    if base_model:
        meta["base_model"] = base_model
    if card.get("license"):
        meta["license"] = card["license"]
    meta["tags"] = tags
    pipeline_tag = _pipeline_tag(details)
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    tag = f"v{details.version}"

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {details.name} {details.version}", ""]
    lines += [card.get("description") or f"A LoRA adapter{f' for {base_model}' if base_model else ''}.", ""]
    lines += _shape_table(details)
    if details.parents:
        lines += ["## Lineage", "", *_lineage_lines(details), ""]
    if recipe_toml:
        lines += ["## Recipe", "", "```toml", recipe_toml.rstrip(), "```", ""]
    lines += _usage(details, repo_id=repo_id, tag=tag, base_model=base_model)
    return "\n".join(lines).rstrip() + "\n"


def _pipeline_tag(details: VersionDetails) -> str | None:
    """The task the adapter was made for decides, whatever the file format uploaded."""
    if details.task_type:
        return PIPELINE_TAGS.get(str(details.task_type).upper())
    return "text-to-image" if _for_diffusion(details) else None


def _for_diffusion(details: VersionDetails) -> bool:
    """A kohya / diffusers file of an adapter not made for a transformers task (no task_type, no Conv1D)."""
    return (details.format in ("kohya", "diffusers") and not details.task_type
            and not details.config.get("fan_in_fan_out"))


def _shape_table(details: VersionDetails) -> list[str]:
    """One row per target module name: the ranks and alphas its modules have in the weights (after
    rank_pattern / alpha_pattern), so the largest rank a server must allow is on the card."""
    lines = ["## Shape", ""]
    facts = [f"type: {details.adapter_type}", f"format: {details.format}"]
    if details.n_params:
        facts.append(f"{details.n_params:,} parameters")
    if details.rank is not None:
        facts.append(f"largest rank {details.rank}")
    if details.use_rslora:
        facts.append("rsLoRA scaling")
    lines += [", ".join(facts), "", "| target module | rank | alpha |", "|---|---|---|"]
    by_leaf: dict[str, tuple[set[Any], set[Any]]] = {}  # int / float (None where the config has none)
    for module in details.modules:
        ranks, alphas = by_leaf.setdefault(module.name.rsplit(".", 1)[-1], (set(), set()))
        ranks.add(module.rank)
        alphas.add(module.alpha)
    if not details.modules:  # no module list: what the config declares, per target
        rank, alpha = details.config.get("r", details.rank), details.alpha
        for target in details.target_modules_found or details.target_modules or ["(all)"]:
            by_leaf[target] = ({details.rank_pattern.get(target, rank)}, {details.alpha_pattern.get(target, alpha)})
    for leaf, (ranks, alphas) in sorted(by_leaf.items()):
        lines.append(f"| `{leaf}` | {', '.join(map(str, sorted(ranks)))} | {', '.join(map(str, sorted(alphas)))} |")
    return [*lines, ""]


def _lineage_lines(details: VersionDetails) -> list[str]:
    lines = [f"- method: `{(details.recipe or {}).get('method')}`", ""]
    lines += ["| name | version | digest | weight |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.version} | {p.digest} | {p.weight} |" for p in details.parents]
    return lines


def _usage(details: VersionDetails, *, repo_id: str, tag: str, base_model: str | None) -> list[str]:
    base = base_model or "<base model>"
    lines = ["## Use it", ""]
    if _for_diffusion(details):
        lines += [
            "With diffusers:",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base}")',
            f'pipe.load_lora_weights("{repo_id}", revision="{tag}")',
            "```",
        ]
    else:
        auto = _AUTO_CLASSES.get(str(details.task_type or "").upper(), "AutoModel")
        lines += [
            "With PEFT:",
            "",
            "```python",
            f"from transformers import {auto}",
            "from peft import PeftModel",
            "",
            f'base = {auto}.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}", revision="{tag}")',
            "```",
        ]
    lines += ["", "With loramgr:", "", "```bash", f"loramgr install hf://{repo_id}@{tag}", "```", ""]
    return lines

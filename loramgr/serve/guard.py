"""The one refusal every deployment and engine export makes first: the engine's compatibility check.

The rules are those of ``loramgr check --engine`` (:mod:`loramgr.compat.engines`); an adapter with an
error finding is refused in one line, before anything is written, naming the adapter, the module and
the rule, with the count of further errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import IncompatibleError

if TYPE_CHECKING:
    from ..adapter import LoraAdapter
    from ..compat.basemodel import BaseFingerprint
    from ..compat.engines import EngineSpec
    from ..compat.findings import Finding


def require_engine_ok(
    adapters: list[LoraAdapter],
    engine: str | EngineSpec,
    *,
    labels: list[str],
    base: BaseFingerprint | None = None,
    adapter_bases: list[BaseFingerprint | None] | None = None,
) -> list[Finding]:
    """Run the engine's check on ``adapters``; raise IncompatibleError on any error, else return the warnings."""
    from ..compat.check import check_adapters

    findings = check_adapters([a.info for a in adapters], base=base, engine=engine, labels=labels,
                              adapter_bases=adapter_bases)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
        first = errors[0]
        where = f" [{first.module}]" if first.module else ""
        raise IncompatibleError(f"{first.adapter}{where}: {first.message}{more}",
                                hint=f"nothing was written; 'loramgr check --engine {engine}' lists every finding")
    return [f for f in findings if f.severity == "warning"]

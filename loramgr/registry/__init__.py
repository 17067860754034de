"""The local registry: versioned adapters in a database over a content-addressed blob store."""

from .core import Registry, describe_version
from .maintenance import execute_gc, execute_remove, plan_gc, plan_remove, verify
from .records import InstallResult, Parent, Plan, VerifyReport, VersionRow
from .refs import Reference, parse_reference

__all__ = [
    "InstallResult",
    "Parent",
    "Plan",
    "Reference",
    "Registry",
    "VerifyReport",
    "VersionRow",
    "describe_version",
    "execute_gc",
    "execute_remove",
    "parse_reference",
    "plan_gc",
    "plan_remove",
    "verify",
]

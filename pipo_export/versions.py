"""Installed versions of the packages an artifact depends on (recorded in manifests)."""
from __future__ import annotations

import importlib.metadata as md


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """name -> installed version, for those of `packages` that are installed."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out

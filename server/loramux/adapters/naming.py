"""Adapter names and where they live on disk.

A name is one path component from a strict alphabet; it resolves to <root>/<name>
under the first configured root that has it, and the real path (symlinks followed)
must stay inside that root's real path. Adapters are data that strangers may send
names for, so nothing here ever accepts a path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loramux.errors import FailedPrecondition, InvalidArgument, NotFound

ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PATTERN_TEXT = "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ without '..'"


def validate_adapter_name(name: str) -> str:
    """Return `name` if it is a valid adapter name, else raise InvalidArgument.

    Valid: 1-128 chars from [A-Za-z0-9._-], starting with a letter or digit, and no
    "..". That rules out absolute paths, separators and parent references.
    """
    # fullmatch, not match: "$" alone would accept a trailing newline.
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"adapter name {name!r} is not allowed: names must match {_PATTERN_TEXT}"
        )
    return name


def is_within(path: str, root: str) -> bool:
    """True when real path `path` is `root` itself or below it (both already real)."""
    return os.path.commonpath([path, root]) == root


def resolve_adapter_dir(name: str, roots: list[Path]) -> Path:
    """Real path of adapter `name`'s directory under the first root that has it.

    Raises InvalidArgument for a bad name or an entry whose real path leaves its
    root (symlink escape) or is not a directory; NotFound when no root has it;
    FailedPrecondition when no roots are configured.
    """
    validate_adapter_name(name)
    if not roots:
        raise FailedPrecondition(
            "no adapter roots are configured; set the adapter roots to load adapters"
        )
    for root in roots:
        candidate = os.path.join(root, name)
        # lexists: a dangling symlink is still an entry we must judge, not skip.
        if not os.path.lexists(candidate):
            continue
        return _check_inside(name, candidate, os.path.realpath(root))
    raise NotFound(
        f"adapter {name!r} not found in adapter roots {[str(r) for r in roots]}"
    )


def _check_inside(name: str, candidate: str, root_real: str) -> Path:
    real = os.path.realpath(candidate)
    if real == root_real or not is_within(real, root_real):
        raise InvalidArgument(
            f"adapter {name!r} resolves outside the adapter root {root_real} "
            f"(real path {real}); symlinks leaving the root are refused"
        )
    if not os.path.isdir(real):
        raise InvalidArgument(f"adapter {name!r} at {candidate} is not a directory")
    return Path(real)

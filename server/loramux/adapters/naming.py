"""Adapter names and where they live on disk.

A name is one path component from a strict alphabet; it resolves to <root>/<name>
under the first configured root that has it, and the real path (symlinks followed)
must stay inside that root's real path. Adapters are data that strangers may send
names for, so nothing here ever accepts a path, and no message names one: they reach
inference callers, who only ever see adapter names (the server's log has the paths).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from loramux.errors import FailedPrecondition, InvalidArgument, NotFound

_log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class AdapterLocation:
    """Where a name resolved: `entry` is <root>/<name> as configured (symlinks not
    followed), `real` its real path, a directory inside that root's real path."""

    entry: Path
    real: Path


def resolve_adapter_dir(name: str, roots: list[Path]) -> Path:
    """Real path of adapter `name`'s directory under the first root that has it.

    Raises as locate_adapter does.
    """
    return locate_adapter(name, roots).real


def locate_adapter(name: str, roots: list[Path]) -> AdapterLocation:
    """Adapter `name`'s directory under the first root that has an entry of that name.

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
        try:
            real = _check_inside(name, candidate, os.path.realpath(root))
        except InvalidArgument as e:
            _log.warning("%s (entry %s, real path %s)", e, candidate, os.path.realpath(candidate))
            raise
        return AdapterLocation(Path(candidate), real)
    n = len(roots)
    raise NotFound(f"adapter {name!r} not found in the {n} adapter root{'s' * (n > 1)}")


def scan_adapter_dirs(roots: list[Path]) -> dict[str, Path]:
    """name → real directory for every entry of the roots that a request could name:
    what resolve_adapter_dir returns for it. First root wins, as for loading, even
    when its entry is unusable; entries with invalid names, escaping symlinks or no
    directory behind them, and unreadable roots are skipped. Not recursive: a name
    is one path component. Says nothing about the files inside.
    """
    found: dict[str, Path | None] = {}
    for root in roots:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        root_real = os.path.realpath(root)
        for name in sorted(names):
            if name in found or not _is_valid_name(name):
                continue
            try:
                found[name] = _check_inside(name, os.path.join(root, name), root_real)
            except InvalidArgument:
                found[name] = None  # shadows the same name in later roots
    return {n: p for n, p in found.items() if p is not None}


def _is_valid_name(name: str) -> bool:
    try:
        validate_adapter_name(name)
    except InvalidArgument:
        return False
    return True


def _check_inside(name: str, candidate: str, root_real: str) -> Path:
    real = os.path.realpath(candidate)
    if real == root_real or not is_within(real, root_real):
        raise InvalidArgument(
            f"adapter {name!r} resolves outside the adapter root; symlinks leaving "
            "the root are refused"
        )
    if not os.path.isdir(real):
        raise InvalidArgument(f"adapter {name!r} is not a directory")
    return Path(real)

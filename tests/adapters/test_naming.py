"""Adapter names resolve only to directories inside the configured roots."""

from __future__ import annotations

import os

import pytest

from loramux.adapters.naming import (
    ADAPTER_NAME_PATTERN,
    resolve_adapter_dir,
    validate_adapter_name,
)
from loramux.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.mark.parametrize(
    "name", ["a", "A0", "my-adapter_v1.2", "0" * 128, "x.y", "sql.lora-r8"]
)
def test_valid_names(name):
    assert validate_adapter_name(name) == name
    assert ADAPTER_NAME_PATTERN.fullmatch(name)


@pytest.mark.parametrize(
    "name",
    [
        "", ".", "..", "../etc", "a/../b", "a/b", "/etc/passwd", "/abs", "-flag", ".hidden",
        "_x", "a b", "a\nb", "name\n", "ü", "a\\b", "a..b", "x" * 129, "a:b", "~root",
    ],
)
def test_bad_names_are_invalid_argument_with_pattern(name, tmp_path):
    with pytest.raises(InvalidArgument, match=r"must match \^\[A-Za-z0-9\]"):
        validate_adapter_name(name)
    with pytest.raises(InvalidArgument, match="names must match"):
        resolve_adapter_dir(name, [tmp_path])


def test_resolves_first_root_that_has_it(tmp_path):
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    (r1 / "a").mkdir(parents=True)
    (r2 / "a").mkdir(parents=True)
    (r2 / "b").mkdir(parents=True)
    assert resolve_adapter_dir("a", [r1, r2]) == (r1 / "a").resolve()
    assert resolve_adapter_dir("b", [r1, r2]) == (r2 / "b").resolve()


def test_symlink_inside_root_is_followed(tmp_path):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    os.symlink(root / "real", root / "alias")
    assert resolve_adapter_dir("alias", [root]) == (root / "real").resolve()


def test_root_itself_may_be_a_symlink(tmp_path):
    (tmp_path / "store" / "a").mkdir(parents=True)
    os.symlink(tmp_path / "store", tmp_path / "link")
    assert resolve_adapter_dir("a", [tmp_path / "link"]) == (tmp_path / "store" / "a").resolve()


def test_symlinked_dir_escaping_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "evil")
    with pytest.raises(InvalidArgument, match="resolves outside the adapter root"):
        resolve_adapter_dir("evil", [root])


def test_symlink_to_sibling_with_root_prefix_is_refused(tmp_path):
    # "/x/root-other" starts with "/x/root" as a string but is not inside it.
    root, sibling = tmp_path / "root", tmp_path / "root-other"
    root.mkdir()
    sibling.mkdir()
    os.symlink(sibling, root / "evil")
    with pytest.raises(InvalidArgument, match="resolves outside the adapter root"):
        resolve_adapter_dir("evil", [root])


def test_symlink_to_root_itself_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(root, root / "self")
    with pytest.raises(InvalidArgument, match="resolves outside the adapter root"):
        resolve_adapter_dir("self", [root])


def test_dangling_symlink_outside_is_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "nowhere", root / "gone")
    with pytest.raises(InvalidArgument, match="resolves outside the adapter root"):
        resolve_adapter_dir("gone", [root])


def test_file_instead_of_directory_is_refused(tmp_path):
    (tmp_path / "a").write_text("not a dir")
    with pytest.raises(InvalidArgument, match="not a directory"):
        resolve_adapter_dir("a", [tmp_path])


def test_not_found_names_the_adapter_but_no_root_path(tmp_path):
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    r1.mkdir()
    r2.mkdir()
    with pytest.raises(NotFound) as e:
        resolve_adapter_dir("missing", [r1, r2])
    assert str(e.value) == "adapter 'missing' not found in the 2 adapter roots"


def test_no_roots_is_failed_precondition():
    with pytest.raises(FailedPrecondition, match="no adapter roots"):
        resolve_adapter_dir("a", [])

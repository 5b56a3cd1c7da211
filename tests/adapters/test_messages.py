"""Messages from resolving and loading adapters reach inference callers: they name the
adapter and the file under its root (`x/adapter_model.safetensors`), never a path
on the server."""

from __future__ import annotations

import logging
import os

import pytest

from loramux.adapters.store import AdapterStore
from loramux.config import AdapterConfig
from loramux.errors import InvalidArgument, LoramuxError, NotFound
from tests.adapters.conftest import lora_config, write_adapter


def _message(store: AdapterStore, name: str, error=LoramuxError) -> str:
    with pytest.raises(error) as e:
        store.get(name)
    return str(e.value)


def _server_paths(tmp_path) -> list[str]:
    return [str(tmp_path), os.path.realpath(tmp_path), "/tmp/"]


CASES = {
    "not found": (lambda root, out: None, "ghost", NotFound,
                  "adapter 'ghost' not found in the 1 adapter root"),
    "directory symlink leaving the root": (
        lambda root, out: os.symlink(out, root / "esc"), "esc", InvalidArgument,
        "adapter 'esc' resolves outside the adapter root"),
    "a file, not a directory": (
        lambda root, out: (root / "file").write_text("x"), "file", InvalidArgument,
        "adapter 'file' is not a directory"),
    "missing weights": (
        lambda root, out: (root / "x" / "adapter_model.safetensors").unlink(), "x", InvalidArgument,
        "x/ is missing adapter_model.safetensors"),
    "weights symlink leaving the directory": (
        lambda root, out: _replace_with_symlink(root / "x" / "adapter_model.safetensors",
                                                out / "adapter_model.safetensors"),
        "x", InvalidArgument, "x/adapter_model.safetensors resolves outside the adapter directory"),
    "weights not a regular file": (
        lambda root, out: _replace_with_fifo(root / "x" / "adapter_model.safetensors"),
        "x", InvalidArgument, "x/adapter_model.safetensors is not a regular file"),
    "weights over max_file_bytes": (
        lambda root, out: _grow(root / "x" / "adapter_model.safetensors"), "x", InvalidArgument,
        "x/adapter_model.safetensors is 4194304 bytes, over the max_file_bytes limit"),
    "config symlink leaving the directory": (
        lambda root, out: _replace_with_symlink(root / "x" / "adapter_config.json",
                                                out / "adapter_config.json"),
        "x", InvalidArgument, "x/adapter_config.json resolves outside the adapter directory"),
}


def _replace_with_symlink(path, target) -> None:
    path.unlink()
    os.symlink(target, path)


def _replace_with_fifo(path) -> None:
    path.unlink()
    os.mkfifo(path)


def _grow(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(4 * 1024 * 1024)


@pytest.mark.parametrize("case", list(CASES))
def test_messages_name_the_adapter_and_no_server_path(case, tmp_path, tiny_spec, good_adapter, caplog):
    arrange, name, error, expected = CASES[case]
    root, outside = tmp_path / "root", tmp_path / "outside"
    good_adapter(root / "x")
    good_adapter(outside)
    arrange(root, outside)
    store = AdapterStore(AdapterConfig(roots=[root], max_file_bytes=1024 * 1024), tiny_spec)
    with caplog.at_level(logging.WARNING):
        msg = _message(store, name, error)
    assert expected in msg
    for path in _server_paths(tmp_path):
        assert path not in msg
    if "outside" in expected:  # the operator still learns where, from the server's log
        assert str(outside) in caplog.text


def test_refusals_inside_the_files_carry_no_path_either(tmp_path, tiny_spec, good_adapter):
    root = tmp_path / "root"
    write_adapter(root / "dora", lora_config(use_dora=True), None)
    (root / "dora" / "adapter_model.safetensors").write_bytes(b"\x05" * 16)
    good_adapter(root / "rank")
    (root / "rank" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0}')
    store = AdapterStore(AdapterConfig(roots=[root]), tiny_spec)
    for name in ("dora", "rank"):
        msg = _message(store, name, InvalidArgument)
        assert msg.startswith(f"adapter {name!r} refused")
        assert not any(p in msg for p in _server_paths(tmp_path))

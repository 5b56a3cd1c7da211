"""Listing shows every adapter under the roots, cached or not: the store, the
protobuf message both ways, the `loramux adapters` table, and Admin.ListAdapters on
a real server."""

from __future__ import annotations

import json
import os
import shutil

import grpc
import loramux_client as lc
import pytest
from loramux_client import convert as client_convert

from loramux import cli
from loramux.adapters.naming import scan_adapter_dirs
from loramux.adapters.store import AdapterInfo, AdapterStore
from loramux.config import AdapterConfig
from loramux.service import convert
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc
from tests.adapters.conftest import lora_config, write_adapter
from tests.conftest import make_adapter
from tests.service.conftest import start_server, tiny_engine_config


@pytest.fixture
def roots(tmp_path, good_adapter):
    """r1: a, b, an invalid-name dir, a config-only dir, a file, an escaping symlink,
    a nested adapter; r2: a (shadowed by r1's), d."""
    r1, r2, outside = tmp_path / "r1", tmp_path / "r2", tmp_path / "outside"
    for d in (r1 / "a", r1 / "b", r1 / "group" / "inner", r2 / "a", r2 / "d", outside):
        good_adapter(d)
    good_adapter(r1 / "-bad-name")
    write_adapter(r1 / "config-only", lora_config(), None)
    (r1 / "notes.txt").write_text("not an adapter")
    os.symlink(outside, r1 / "escape")
    return [r1, r2]


def test_scan_follows_naming_rules(roots):
    found = scan_adapter_dirs(roots)
    assert sorted(found) == ["a", "b", "config-only", "d", "group"]
    assert found["a"] == (roots[0] / "a").resolve()  # first root wins, as for loading


def test_store_lists_every_adapter_under_the_roots(roots, tiny_spec):
    store = AdapterStore(AdapterConfig(roots=roots), tiny_spec)
    b = store.load("b")
    infos = store.list()
    assert [i.name for i in infos] == ["a", "b", "d"]  # sorted; no invalid or nested entries
    by_name = {i.name: i for i in infos}
    assert by_name["b"] == AdapterInfo("b", b.rank, b.nbytes, 1, False, True, b.base_model_name,
                                       b.content_hash, cached=True)
    assert by_name["a"] == AdapterInfo("a", 0, 0, 0, False, False, None, "", cached=False)
    assert not by_name["d"].cached


def test_a_cached_adapter_stays_listed_when_its_directory_goes(roots, tiny_spec):
    store = AdapterStore(AdapterConfig(roots=roots), tiny_spec)
    store.pin("d")
    shutil.rmtree(roots[1] / "d")
    assert [(i.name, i.cached, i.pinned) for i in store.list()] == [
        ("a", False, False), ("b", False, False), ("d", True, True)]


def test_store_without_roots_lists_nothing(tiny_spec):
    assert AdapterStore(AdapterConfig(roots=[]), tiny_spec).list() == []


def test_protobuf_carries_cached_both_ways():
    uncached = convert.adapter_info(AdapterInfo("a", 0, 0, 0, False, False, None, "", cached=False))
    assert uncached.HasField("cached") and not uncached.cached
    assert client_convert.adapter_info_from_pb(uncached).cached is False
    cached = convert.adapter_info(AdapterInfo("b", 8, 10, 2, True, True, "m", "ab" * 32))
    assert client_convert.adapter_info_from_pb(cached) == lc.AdapterInfo(
        "b", 8, 10, 2, True, "m", "ab" * 32, cached=True)
    # A server from before the field lists cached adapters only.
    assert client_convert.adapter_info_from_pb(pb.AdapterInfo(name="old", rank=4)).cached is True


def test_cli_table_shows_which_are_cached(capsys):
    cli.show_adapters([
        lc.AdapterInfo("sql", 8, 3 << 20, 14, True, "tiny", "ab" * 32, cached=True),
        lc.AdapterInfo("todo", 0, 0, 0, False, "", "", cached=False),
    ])
    header, sql, todo = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "RANK", "SIZE", "MODULES", "CACHED", "KEPT", "BASE", "MODEL", "HASH"]
    assert sql.split() == ["sql", "8", "3.0", "MiB", "14", "yes", "yes", "tiny", "ab" * 6]
    assert todo.split() == ["todo", "-", "-", "-", "no"]


def test_admin_lists_uncached_adapters_over_grpc(tmp_path, tiny_llama_dir, capsys):
    root = tmp_path / "root"
    make_adapter(tiny_llama_dir, root / "x", seed=1)
    make_adapter(tiny_llama_dir, root / "y", seed=2)
    server = start_server(tiny_engine_config(tiny_llama_dir, root))
    try:
        with grpc.insecure_channel(server.address) as channel:
            admin = pb_grpc.AdminStub(channel)
            listed = admin.ListAdapters(pb.ListAdaptersRequest()).adapters
            assert [(a.name, a.cached) for a in listed] == [("x", False), ("y", False)]
            loaded = admin.LoadAdapter(pb.LoadAdapterRequest(name="x"))
            assert loaded.cached and loaded.rank == 8
            listed = admin.ListAdapters(pb.ListAdaptersRequest()).adapters
            assert [(a.name, a.cached, a.rank) for a in listed] == [("x", True, 8), ("y", False, 0)]
        assert cli.main(["adapters", "--server", server.address, "--json"], env={}) == 0
        out = json.loads(capsys.readouterr().out)
        assert [(a["name"], a["cached"]) for a in out] == [("x", True), ("y", False)]
    finally:
        server.stop()

"""The `loramux` command against a real server (the client tests use a fake one to
check exactly what goes over the wire; this checks the real round trip)."""

from __future__ import annotations

import json

from loramux import cli


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv), env={})
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_adapters_merges_pin_info_through_the_cli(tiny_server, capsys):
    server = ("--server", tiny_server.address)
    code, out, err = _run(capsys, "generate", *server, "--prompt", "The quick", "--adapter", "x",
                          "--max-tokens", "4", "--ignore-eos", "--no-stream", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["completion_tokens"] == 4 and result["resolution"]["name"] == "x"

    assert _run(capsys, "merges", "create", "cli-xy", *server, "--mix", "x=0.5,y=0.5")[0] == 0
    code, out, _ = _run(capsys, "merges", *server, "--json")
    assert code == 0 and [m["name"] for m in json.loads(out)] == ["cli-xy"]
    assert _run(capsys, "pin", *server, "--merge", "cli-xy")[0] == 0
    code, out, _ = _run(capsys, "info", *server, "--json")
    assert code == 0 and json.loads(out)["pinned"] == "merge:cli-xy"
    assert _run(capsys, "unpin", *server)[0] == 0
    assert _run(capsys, "merges", "delete", "cli-xy", *server)[0] == 0

    code, _, err = _run(capsys, "generate", *server, "--prompt", "hi", "--adapter", "../x")
    assert code == 2 and "InvalidArgument" in err
    code, out, _ = _run(capsys, "adapters", *server, "--json")
    assert code == 0 and "x" in [a["name"] for a in json.loads(out)]

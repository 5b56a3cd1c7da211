"""The `loramux` command's client subcommands, run in-process against the fake server."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from loramux import cli
from tests.client.conftest import STREAM_PIECES

TEXT = "".join(STREAM_PIECES)

COMMANDS = [
    [], ["generate"], ["adapters"], ["adapters", "list"], ["adapters", "load"], ["adapters", "unload"],
    ["merges"], ["merges", "list"], ["merges", "create"], ["merges", "delete"], ["pin"], ["unpin"],
    ["export"], ["info"], ["run"], ["serve"], ["bench"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "loramux")
def test_every_help_works(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"], env={})
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loramux")
    if len(command) < 2:  # top-level commands carry examples
        assert "example" in out


def run(capsys, *argv, env=None):
    """(exit code, stdout, stderr) of `loramux ARGV`."""
    code = cli.main(list(argv), env=env or {})
    out, err = capsys.readouterr()
    return code, out, err


# --- argument parsing -------------------------------------------------------


def test_parse_mix():
    assert cli.parse_mix("sql=0.6, chat=-0.4") == [("sql", 0.6), ("chat", -0.4)]
    for bad in ("sql", "sql=", "=1", "sql=x", "a=1,,b=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_mix(bad)


@pytest.mark.parametrize("text,value", [
    ("density=0.5", 0.5), ("k=3", 3), ("normalize=true", True), ("normalize=False", False),
    ("majority_sign_method=frequency", "frequency"), ("t=1e-3", 1e-3), ("x=-2", -2),
])
def test_parse_param_types(text, value):
    key, parsed = cli.parse_param(text)
    assert key == text.split("=")[0] and parsed == value and type(parsed) is type(value)


def _parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_mix_flags_build_a_mix():
    args = _parse("pin", "--mix", "a=0.5,b=0.5", "--method", "dare_ties", "--density", "0.3",
                  "--param", "normalize=true", "--param", "k=2", "--mix-seed", "7")
    mix = cli.mix_from_args(args)
    assert mix.adapters == (("a", 0.5), ("b", 0.5)) and mix.method == "dare_ties" and mix.seed == 7
    assert mix.params == {"density": 0.3, "normalize": True, "k": 2}
    assert type(mix.params["normalize"]) is bool


def test_mix_options_without_mix_and_density_twice_are_usage_errors(capsys):
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--adapter", "a", "--method", "ties")
    assert code == 2 and "only apply with --mix" in err
    code, _, err = run(capsys, "pin", "--mix", "a=1", "--density", "0.5", "--param", "density=0.2")
    assert code == 2 and "density given twice" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--system", "be brief")
    assert code == 2 and "--system goes with --chat" in err


def test_selection_is_exclusive_and_required_where_it_must_be(capsys):
    with pytest.raises(SystemExit):
        _parse("generate", "--prompt", "hi", "--adapter", "a", "--merge", "m")
    with pytest.raises(SystemExit):
        _parse("export", "out")
    with pytest.raises(SystemExit):
        _parse("generate", "--adapter", "a")  # no prompt


def test_client_flags_before_or_after_the_action():
    assert _parse("adapters", "--server", "x:1", "load", "a").server == "x:1"
    assert _parse("adapters", "load", "a", "--server", "y:2").server == "y:2"
    assert _parse("adapters", "load", "a").server == "localhost:50051"
    assert _parse("merges", "--json", "delete", "m").json is True


def test_environment_supplies_defaults():
    defaults = cli.ClientDefaults.from_env({"LORAMUX_SERVER": "h:9", "LORAMUX_API_TOKEN": "t"})
    args = cli.build_parser(defaults).parse_args(["info"])
    assert (args.server, args.token, args.admin_token) == ("h:9", "t", None)


# --- against the fake server ------------------------------------------------


def test_generate_streams_text_then_a_summary(fake_server, capsys):
    code, out, err = run(capsys, "generate", "--server", fake_server.target, "--chat", "hi",
                         "--system", "be brief", "--mix", "sql=0.6,chat=0.4", "--method", "ties",
                         "--density", "0.5", "--param", "normalize=true", "--temperature", "0.7")
    assert code == 0 and out == TEXT + "\n"
    assert "length" in err and "3 generated" in err and "mix ties(sql=0.6,chat=0.4)" in err
    assert "rank 12" in err and "rel. error 2.00e-03" in err
    rpc, request, _ = fake_server.inference.last()
    assert rpc == "GenerateStream"
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "be brief"), ("user", "hi")]
    assert request.mix.params["normalize"].WhichOneof("kind") == "flag"
    assert request.mix.params["density"].number == 0.5
    assert request.sampling.HasField("temperature") and not request.sampling.HasField("max_tokens")


def test_generate_no_stream_and_json(fake_server, capsys):
    code, out, err = run(capsys, "generate", "--server", fake_server.target, "--prompt", "hi",
                         "--adapter", "sql", "--no-stream", "--max-tokens", "3", "--stop", "END")
    assert code == 0 and out == TEXT + "\n" and "adapter sql (cache hit)" in err
    request = fake_server.inference.last("Generate")[1]
    assert request.sampling.max_tokens == 3 and list(request.sampling.stop) == ["END"]
    code, out, _ = run(capsys, "generate", "--server", fake_server.target, "--prompt", "hi", "--json")
    result = json.loads(out)
    assert result["text"] == TEXT and result["resolution"]["kind"] == "base"


def test_server_error_exits_2_with_the_status_name(fake_server, capsys):
    code, out, err = run(capsys, "generate", "--server", fake_server.target, "--prompt", "bad")
    assert code == 2 and err.strip() == "loramux: InvalidArgument: prompt is bad"
    code, _, err = run(capsys, "adapters", "load", "nope", "--server", fake_server.target)
    assert code == 2 and err.startswith("loramux: NotFound: no adapter named 'nope'")


def test_unreachable_server_says_where_and_how_to_start_one(capsys):
    code, _, err = run(capsys, "info", "--server", "127.0.0.1:1", "--timeout", "5")
    assert code == 2
    assert "cannot connect to a loramux server at 127.0.0.1:1" in err and "loramux serve" in err


def test_tokens_from_flags_files_and_env(fake_server_factory, tmp_path, capsys):
    fake = fake_server_factory(token="inf", admin_token="adm")
    (tmp_path / "adm").write_text("adm\n")
    code, _, _ = run(capsys, "adapters", "--server", fake.target, "--admin-token-file", str(tmp_path / "adm"))
    assert code == 0 and fake.admin.last()[2]["authorization"] == "Bearer adm"
    env = {"LORAMUX_SERVER": fake.target, "LORAMUX_API_TOKEN": "inf"}
    code, _, _ = run(capsys, "generate", "--prompt", "hi", env=env)
    assert code == 0 and fake.inference.last()[2]["authorization"] == "Bearer inf"
    code, _, err = run(capsys, "info", env=env)  # the API token is not the admin token
    assert code == 2 and "Unauthenticated" in err


def test_adapters_table_json_load_and_unload(fake_server, capsys):
    code, out, _ = run(capsys, "adapters", "--server", fake_server.target)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NAME", "RANK", "SIZE"]
    assert lines[1].split()[:4] == ["sql", "8", "3.0", "MiB"] and "yes" in lines[1]
    code, out, _ = run(capsys, "adapters", "list", "--json", "--server", fake_server.target)
    assert [a["name"] for a in json.loads(out)] == ["sql", "chat"]
    code, out, _ = run(capsys, "adapters", "load", "chat", "--keep", "--server", fake_server.target)
    assert code == 0 and "chat" in out and fake_server.admin.last()[1].keep is True
    code, out, _ = run(capsys, "adapters", "unload", "chat", "--server", fake_server.target)
    assert code == 0 and out.strip() == "unloaded chat"


def test_merges_pin_export_info(fake_server, capsys):
    target = ["--server", fake_server.target]
    code, out, _ = run(capsys, "merges", "create", "m1", "--mix", "sql=0.6,chat=0.4", "--method", "ties",
                       "--density", "0.5", *target)
    assert code == 0 and "m1" in out
    code, out, _ = run(capsys, "merges", "--json", *target)
    merges = json.loads(out)
    assert merges[0]["mix"]["params"] == {"density": 0.5} and merges[0]["rank"] == 12
    assert run(capsys, "merges", "delete", "m1", *target)[1].strip() == "deleted merge m1"
    code, out, _ = run(capsys, "pin", "--merge", "m1", *target)
    assert code == 0 and out.startswith("pinned m1")
    assert "nothing pinned" in run(capsys, "unpin", *target)[1]
    code, out, _ = run(capsys, "export", "out", "--pinned-model", *target)
    assert code == 0 and out.startswith("wrote /exports/out")
    assert fake_server.admin.last("Export")[1].pinned_model is True
    code, out, _ = run(capsys, "info", *target)
    assert code == 0 and "SmolLM2-135M-Instruct" in out and "1 / 8 used" in out
    assert json.loads(run(capsys, "info", "--json", *target)[1])["adapter_cache"]["entries"] == 2


def test_client_commands_do_not_load_torch():
    code = ("import sys; from loramux import cli; cli.build_parser(command='generate'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

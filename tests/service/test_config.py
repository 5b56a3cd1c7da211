"""Configuration: pydantic-checked configs, TOML errors, flags over the file,
config errors before torch loads, the /metrics bind address, and logging."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loramux import cli, logs
from loramux.cliargs import add_serve_args, serve_configs
from loramux.config import (
    AdapterConfig,
    ConfigError,
    EngineConfig,
    KvCacheConfig,
    ServerConfig,
    SlotConfig,
    load_toml,
)
from loramux.errors import InvalidArgument

SERVE = [sys.executable, "-m", "loramux.cli", "serve"]


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "loramux.toml"
    path.write_text(text)
    return path


def _serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    return p.parse_args(list(argv))


# ---- the config classes -----------------------------------------------------------


def test_fields_are_checked_on_construction_and_assignment_with_errors_naming_them():
    with pytest.raises(ConfigError, match=r"^\[server\] port: must be less than or equal to 65535 \(got 70000\)$"):
        ServerConfig(port=70000)
    with pytest.raises(ConfigError, match=r"\[model\] dtype: must be 'auto', 'float32', 'bfloat16' or 'float16'"):
        EngineConfig(model={"dtype": "fp8"})
    with pytest.raises(ConfigError, match=r"\[engine\] bogus: unknown key; known: max_batch_rows"):
        EngineConfig(bogus=1)
    with pytest.raises(ConfigError, match=r"\[kv_cache\] prefix_caching: must be a valid boolean \(got 1\)"):
        KvCacheConfig(prefix_caching=1)
    engine = EngineConfig()
    engine.max_batch_rows = 64  # assignment is checked too, and stays possible
    with pytest.raises(ConfigError, match=r"\[slots\] num_slots: must be greater than or equal to 1"):
        engine.slots.num_slots = 0
    assert engine.slots.num_slots == 8 and engine.max_batch_rows == 64
    assert isinstance(ConfigError([("x", "y")]), InvalidArgument)  # callers catching InvalidArgument still do


def test_defaults_stay_readable_on_the_classes_and_replace_revalidates():
    # Other modules build their flags from the class attributes.
    assert (AdapterConfig.max_rank, SlotConfig.num_slots, EngineConfig.max_batch_tokens) == (64, 8, 2048)
    assert KvCacheConfig.bytes is None and ServerConfig.port == 50051
    server = dataclasses.replace(ServerConfig(), port=6000)
    assert server.port == 6000
    with pytest.raises(ConfigError, match="port"):
        dataclasses.replace(server, port=-5)


def test_cross_field_and_file_system_checks_wait_for_validate(tmp_path):
    engine = EngineConfig(max_batch_rows=64, max_batch_tokens=32)  # assembled first ...
    with pytest.raises(ConfigError, match=r"\[engine\] max_batch_tokens: 32 must be at least max_batch_rows \(64\)"):
        engine.validate()  # ... judged as a whole
    with pytest.raises(ConfigError, match="adapter root .*missing is not a directory"):
        AdapterConfig(roots=[tmp_path / "missing"]).validate()
    with pytest.raises(ConfigError, match=r"\[merges\] max_rank: must be in \[1, 16\]"):
        EngineConfig(adapters=AdapterConfig(max_rank=16), merges={"max_rank": 32}).validate()


def test_metrics_host_defaults_to_the_grpc_host():
    assert ServerConfig().metrics_bind_host == "0.0.0.0"
    assert ServerConfig(host="127.0.0.1").metrics_bind_host == "127.0.0.1"
    assert ServerConfig(host="127.0.0.1", metrics_host="0.0.0.0").metrics_bind_host == "0.0.0.0"


# ---- TOML -------------------------------------------------------------------------


def test_a_single_root_string_is_a_list_of_one(tmp_path):
    engine, _ = load_toml(_toml(tmp_path, '[adapters]\nroots = "adapters"\n'))
    assert engine.adapters.roots == [Path("adapters")]


@pytest.mark.parametrize("text, message", [
    ("[server\n", "not valid TOML: Expected ']'"),
    ("[servr]\nport = 1\n", "unknown section(s) ['servr']; known: ['adapters', 'engine'"),
    ("port = 1\n", "unknown section(s) ['port']"),
    ("[server]\nprot = 1\n", "[server] prot: unknown key; known: host, port,"),
    ("[engine]\nmodel = 1\n", "[engine] model: unknown key; these settings go in a [model] section"),
    ("[adapters]\nroots = 5\n", "[adapters] roots: must be a valid list (got 5)"),
    ('[server]\nport = "6000"\n', "[server] port: must be a valid integer (got '6000')"),
    ("[server]\nport = 70000\n", "[server] port: must be less than or equal to 65535 (got 70000)"),
    ("[kv_cache]\nbytes = 1e9\n", "[kv_cache] bytes: must be a valid integer (got 1000000000.0)"),
    ("[merges]\nerror_budget = 1.5\n", "[merges] error_budget: must be less than 1 (got 1.5)"),
    ('[model]\ndtype = "fp8"\n', "[model] dtype: must be 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp8')"),
])
def test_toml_errors_are_one_line_naming_the_file_and_field(tmp_path, text, message):
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_toml(path)
    assert str(e.value).startswith(f"config file {path}: ")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_every_bad_field_of_a_file_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_toml(_toml(tmp_path, '[server]\nport = "x"\n[slots]\nnum_slots = 0\n'))
    assert [where for where, _ in e.value.problems] == ["[slots] num_slots", "[server] port"]


# ---- flags over the file ------------------------------------------------------------


def test_flags_given_win_over_the_file_even_when_equal_to_the_default(tmp_path):
    path = _toml(tmp_path, '[server]\nport = 6000\nmax_waiting = 3\nhost = "127.0.0.1"\n'
                           '[engine]\nmax_batch_rows = 4\n[model]\ndevice = "cpu"\n[kv_cache]\nprefix_caching = false\n'
                           f'[adapters]\nroots = ["{tmp_path}"]\nmax_rank = 16\n')
    engine, server = serve_configs(_serve_args("--config", str(path), "--port", "50051", "--max-batch-rows", "32",
                                               "--device", "auto", "--max-rank", "64"))
    assert (server.port, engine.max_batch_rows, engine.model.device, engine.adapters.max_rank) == (50051, 32, "auto", 64)
    # what no flag names keeps the file's value
    assert (server.max_waiting, server.host, engine.kv_cache.prefix_caching) == (3, "127.0.0.1", False)
    assert engine.adapters.roots == [tmp_path]
    # a repeatable flag replaces the file's list
    other = tmp_path / "other"
    other.mkdir()
    engine, _ = serve_configs(_serve_args("--config", str(path), "--adapter-root", str(other)))
    assert engine.adapters.roots == [other]


def test_without_a_file_the_defaults_apply_and_more_rows_get_room_to_decode():
    engine, server = serve_configs(_serve_args())
    assert engine == EngineConfig().validate() and server == ServerConfig()
    engine, _ = serve_configs(_serve_args("--max-batch-rows", "4096"))
    assert engine.max_batch_tokens == 4096  # one decode token per row per step
    with pytest.raises(ConfigError, match="max_batch_tokens: 64 must be at least max_batch_rows"):
        serve_configs(_serve_args("--max-batch-rows", "128", "--max-batch-tokens", "64"))


def test_metrics_host_flag_and_key(tmp_path):
    _, server = serve_configs(_serve_args("--host", "127.0.0.1"))
    assert (server.metrics_host, server.metrics_bind_host) == (None, "127.0.0.1")
    path = _toml(tmp_path, '[server]\nmetrics_host = "0.0.0.0"\n')
    _, server = serve_configs(_serve_args("--config", str(path), "--host", "127.0.0.1"))
    assert server.metrics_bind_host == "0.0.0.0"
    _, server = serve_configs(_serve_args("--config", str(path), "--metrics-host", "::1"))
    assert server.metrics_bind_host == "::1"


def test_a_bad_flag_value_is_reported_as_that_flag():
    with pytest.raises(ConfigError, match=r"^--slots: must be greater than or equal to 1 \(got 0\)$"):
        serve_configs(_serve_args("--slots", "0"))
    with pytest.raises(ConfigError, match=r"^--metrics-port: must be greater than or equal to -1"):
        serve_configs(_serve_args("--metrics-port", "-2"))


def test_help_still_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"], env={})
    out = " ".join(capsys.readouterr().out.split())
    for text in ("gRPC port; 0 picks one (default: 50051)", "(default: the --host address)",
                 "rows decoding together (default: 32)", "--log-format {text,json}", "(default: info)"):
        assert text in out, text


# ---- config errors before torch loads -------------------------------------------------


def test_parsing_and_checking_serve_config_imports_no_torch(tmp_path):
    path = _toml(tmp_path, "[server]\nport = 6000\n")
    code = ("import sys; from loramux.cliargs import add_serve_args, serve_configs; import argparse; "
            "p = argparse.ArgumentParser(); add_serve_args(p); "
            f"e, s = serve_configs(p.parse_args(['--config', {str(path)!r}, '--slots', '3'])); "
            "assert (s.port, e.slots.num_slots) == (6000, 3); "
            "print(sorted(m for m in ('torch', 'transformers', 'grpc', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    code = ("import sys; from loramux import cli; cli.build_parser(command='serve'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _serve_fails(argv: list[str]) -> str:
    """Run `argv` (a serve command line) under -X importtime; assert it exits 2
    quickly, without a traceback and without importing torch; its stderr."""
    start = time.monotonic()
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    lines = proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    message = "\n".join(line for line in lines if not line.startswith("import time:"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in message, message
    assert "torch" not in imported and "transformers" not in imported
    assert elapsed < 5, f"{elapsed:.1f} s"  # torch alone takes longer than this
    return message


@pytest.mark.parametrize("text, message", [
    ("[server\n", "not valid TOML"),
    ("[server]\nprot = 1\n", "[server] prot: unknown key"),
    ('[adapters]\nroots = 5\n', "[adapters] roots: must be a valid list (got 5)"),
    ("[server]\nport = 70000\n", "[server] port: must be less than or equal to 65535"),
])
def test_serve_with_a_bad_config_exits_2_at_once_without_a_traceback(tmp_path, text, message):
    path = _toml(tmp_path, text)
    err = _serve_fails([*SERVE, "--config", str(path)])
    assert err.strip().startswith(f"loramux serve: error: config file {path}: ")
    assert message in err and len(err.strip().splitlines()) == 1


def test_serve_with_bad_flags_exits_2_at_once(tmp_path):
    assert "loramux serve: error: --slots: must be greater than or equal to 1" in _serve_fails([*SERVE, "--slots", "0"])
    assert "argument --port: invalid int value: 'abc'" in _serve_fails([*SERVE, "--port", "abc"])
    missing = tmp_path / "missing.toml"
    assert f"config file {missing}: cannot read it" in _serve_fails([*SERVE, "--config", str(missing)])
    assert "adapter root" in _serve_fails([*SERVE, "--adapter-root", str(missing)])


def test_the_installed_entry_point_reports_config_errors_too(tmp_path):
    script = Path(sys.executable).parent / "loramux"
    if not script.exists():
        pytest.skip("the loramux script is not installed next to this Python")
    path = _toml(tmp_path, "[server]\nport = 70000\n")
    proc = subprocess.run([str(script), "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "[server] port: must be less than or equal to 65535" in proc.stderr


# ---- logging --------------------------------------------------------------------------


@pytest.fixture
def configured_logging():
    """logs.configure as the command does; the root logger is put back afterwards."""
    root = logging.getLogger()
    level = root.level
    handlers: list[logging.Handler] = []
    yield lambda *a: handlers.append(logs.configure(*a))
    for h in handlers:
        root.removeHandler(h)
    root.setLevel(level)


FIELDS = {"id": "r1", "selection": "adapter:sql", "prompt_tokens": 12, "completion_tokens": 5, "ttft_s": 0.031,
          "total_s": 0.25, "status": "OK"}


def _last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def test_json_log_lines_carry_the_extra_fields_at_top_level(configured_logging, capsys):
    configured_logging("info", "json")
    logging.getLogger("loramux.service.runner").info("request finished", extra=FIELDS)
    entry = json.loads(_last_line(capsys))
    assert {k: entry[k] for k in ("level", "logger", "message")} == {
        "level": "INFO", "logger": "loramux.service.runner", "message": "request finished"}
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]
    assert {k: entry[k] for k in FIELDS} == FIELDS
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"path": Path("/a b")})
    entry = json.loads(_last_line(capsys))
    assert entry["level"] == "ERROR" and entry["path"] == "/a b" and "ValueError: boom" in entry["exc_info"]


def test_text_log_lines_show_the_extra_fields_as_key_value(configured_logging, capsys):
    configured_logging("info", "text")
    logging.getLogger("loramux.service.runner").info("request finished", extra={**FIELDS, "note": "two words"})
    line = _last_line(capsys)
    assert " INFO loramux.service.runner: request finished id=r1 selection=adapter:sql prompt_tokens=12 " in line
    assert line.endswith('completion_tokens=5 ttft_s=0.031 total_s=0.25 status=OK note="two words"')


def test_the_level_filters(configured_logging, capsys):
    configured_logging("warning", "text")
    logging.getLogger("loramux").info("hidden")
    logging.getLogger("loramux").warning("shown")
    err = capsys.readouterr().err
    assert "shown" in err and "hidden" not in err
    configured_logging("debug", "text")  # a second configure replaces the first handler
    logging.getLogger("loramux").debug("detail")
    assert capsys.readouterr().err.count("detail") == 1


def test_log_options_before_or_after_the_subcommand():
    parse = lambda *argv: cli.build_parser(command=cli.subcommand(list(argv))).parse_args(list(argv))  # noqa: E731
    args = parse("--log-level", "debug", "--log-format", "json", "serve")
    assert (args.command, args.log_level, args.log_format) == ("serve", "debug", "json")
    args = parse("--log-format", "json", "serve", "--log-level", "error")
    assert (args.log_level, args.log_format) == ("error", "json")
    assert parse("info").log_level is None  # the command decides: warning for clients, info for serve
    assert cli.subcommand(["--log-level", "debug", "bench", "--x"]) == "bench"


def _listening_address(port: int) -> str | None:
    """The local IPv4 address a LISTEN socket on `port` is bound to (from /proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            return ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return None


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the socket table from /proc")
def test_serve_logs_where_it_listens_and_the_load_time_and_binds_metrics_to_host(tiny_llama_dir, tmp_path):
    port_file = tmp_path / "ports"
    proc = subprocess.Popen([*SERVE, "--model", str(tiny_llama_dir), "--device", "cpu", "--host", "127.0.0.1",
                             "--port", "0", "--metrics-port", "0", "--port-file", str(port_file),
                             "--grace-seconds", "5", "--log-format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        grpc_port, metrics_port = map(int, port_file.read_text().split())
        assert _listening_address(metrics_port) == "127.0.0.1"  # not 0.0.0.0: it follows --host
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    entries = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    messages = [e["message"] for e in entries]
    assert f"gRPC listening on 127.0.0.1:{grpc_port} (NOT_SERVING until the model is loaded)" in messages
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in messages
    assert f"serving gRPC on 127.0.0.1:{grpc_port}, metrics on 127.0.0.1:{metrics_port}" in messages
    loaded = next(e for e in entries if e["message"].startswith("model loaded in "))
    assert loaded["level"] == "INFO" and loaded["load_s"] > 0 and loaded["device"] == "cpu"

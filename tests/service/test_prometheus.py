"""A real Prometheus (Debian package `prometheus`, installed by deploy/setup.sh
--test) scrapes the server's /metrics; PromQL over the histograms works."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from loramux_api.v1 import loramux_pb2 as pb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(tiny_server, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed; run `bash deploy/setup.sh --test` (installs the Debian package)"
    d = tmp_path_factory.mktemp("prometheus")
    (d / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: loramux\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{tiny_server.server.metrics_port}']\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def _query(base: str, promql: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return []
    return body["data"]["result"] if body.get("status") == "success" else []


def _poll(base: str, promql: str, timeout: float = 40.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = _query(base, promql)
        if result and all(math.isfinite(float(r["value"][1])) for r in result):
            return result
        time.sleep(0.5)
    raise AssertionError(f"no finite result for {promql!r} within {timeout}s")


def test_prometheus_scrapes_and_histogram_quantile_of_ttft_is_a_number(prometheus, inference):
    _poll(prometheus, 'up{job="loramux"} == 1')  # the target is being scraped
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # traffic spanning several scrapes
        inference.Generate(pb.GenerateRequest(prompt="fox", adapter="x", sampling=pb.SamplingParams(max_tokens=4)))
    q = "histogram_quantile(0.5, sum by (le) (rate(loramux_time_to_first_token_seconds_bucket[30s])))"
    value = float(_poll(prometheus, q)[0]["value"][1])
    assert 0 < value < 60
    tokens = _poll(prometheus, "loramux_generation_tokens_total")
    assert float(tokens[0]["value"][1]) >= 4
    ok = _poll(prometheus, 'sum(loramux_requests_total{rpc="Generate",code="OK"})')
    assert float(ok[0]["value"][1]) >= 1
    info = _poll(prometheus, "vllm:lora_requests_info")
    assert info[0]["metric"]["max_lora"] == "8"
    hits = _poll(prometheus, 'loramux_adapter_cache_hits_total{tier="host"}')
    assert float(hits[0]["value"][1]) >= 1
    usage = float(_poll(prometheus, "vllm:kv_cache_usage_perc")[0]["value"][1])
    assert 0 <= usage <= 1
    blocks = {r["metric"]["state"]: float(r["value"][1]) for r in _poll(prometheus, "loramux_kv_cache_blocks")}
    assert set(blocks) == {"used", "cached", "free"} and sum(blocks.values()) > 0
    assert float(_poll(prometheus, "loramux_prefix_cache_queries_total")[0]["value"][1]) >= 1
    assert float(_poll(prometheus, "loramux_step_tokens_count")[0]["value"][1]) >= 1

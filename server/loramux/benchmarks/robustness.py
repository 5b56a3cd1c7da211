"""Robustness figures on the default model, against a real server on loopback:

    python -m loramux.benchmarks.robustness [--streams 4] [--long-tokens 4000]

- head of line: `--streams` greedy streams decode while one `--long-tokens` prompt
  arrives; the largest gap between two tokens of a running stream, against their
  median gap (chunked prefill keeps it near one step);
- oversized prompt: seconds until a 3.9 MB prompt is refused;
- poison: four requests of each poisonous kind sent beside four victims (base,
  adapter, sampled adapter, mix); victims answered OK with their quiet-server
  tokens, and whether the server goes idle after;
- poisonous adapter: an adapter whose lora_alpha is 1e30, asked for by name;
- mix merge: seconds a request waits for a dense (ties) mix of 2, 4 and 8 rank-16
  adapters that is not merged yet (served, or refused over the error budget);
- shutdown: `loramux serve` as a process, `--shutdown-streams` streams of
  `--shutdown-max-tokens` tokens (far more than `--grace-seconds` allows on the
  default model), SIGTERM: seconds to process exit (interpreter exit included), and
  how each stream ended.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from loramux.benchmarks.decode import make_adapters


def _server(base_dir: Path, root: Path):
    from loramux.app import build_engine
    from loramux.config import AdapterConfig, EngineConfig, ModelConfig, ServerConfig
    from loramux.service.main import ServerThread

    engine_cfg = EngineConfig(
        model=ModelConfig(path=base_dir), adapters=AdapterConfig(roots=[root], max_rank=64),
    ).validate()
    server_cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5).validate()
    return ServerThread(server_cfg, lambda: build_engine(engine_cfg))


async def _stream_times(stub, request) -> list[float]:
    times = []
    async for msg in stub.GenerateStream(request, timeout=600):
        if msg.token_ids:
            times.append(time.monotonic())
    return times


async def _head_of_line(address: str, pb, pb_grpc, streams: int, long_tokens: int) -> dict:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        steady = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=96, ignore_eos=True))
        tasks = [asyncio.ensure_future(_stream_times(stub, steady)) for _ in range(streams)]
        await asyncio.sleep(1.0)  # the streams are decoding
        long = pb.GenerateRequest(prompt="the quick brown fox " * (long_tokens // 4),
                                  sampling=pb.SamplingParams(max_tokens=1))
        t0 = time.monotonic()
        await stub.Generate(long, timeout=600)
        long_seconds = time.monotonic() - t0
        times = await asyncio.gather(*tasks)
    gaps = [b - a for ts in times for a, b in zip(ts, ts[1:])]
    return {"long_prompt_seconds": round(long_seconds, 2), "median_gap_ms": round(1e3 * statistics.median(gaps), 1),
            "max_gap_ms": round(1e3 * max(gaps), 1)}


def _oversized(stub, pb) -> float:
    t0 = time.monotonic()
    try:
        stub.Generate(pb.GenerateRequest(prompt="fox jumps " * 390_000), timeout=120)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    return round(time.monotonic() - t0, 3)


async def _poison(address: str, pb, pb_grpc, names: list[str]) -> dict:
    def mix(*pairs, method="linear"):
        return pb.Mix(method=method, adapters=[pb.WeightedAdapter(name=n, weight=w) for n, w in pairs])

    steady = pb.SamplingParams(max_tokens=8, ignore_eos=True)
    victims = [
        pb.GenerateRequest(prompt="fox", sampling=steady),
        pb.GenerateRequest(prompt="SELECT", adapter=names[0], sampling=steady),
        pb.GenerateRequest(prompt="def", adapter=names[1], sampling=pb.SamplingParams(
            max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)),
        pb.GenerateRequest(prompt="{", mix=mix((names[0], 0.5), (names[1], 0.5)), sampling=steady),
    ]
    kinds = {
        "temperature=1e-45": pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(
            max_tokens=8, temperature=1e-45)),
        "repetition_penalty=1e-38": pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(
            max_tokens=8, temperature=1.0, repetition_penalty=1e-38)),
        "mix weight 1e30": pb.GenerateRequest(prompt="fox", sampling=pb.SamplingParams(max_tokens=8, temperature=1.0),
                                              mix=mix((names[0], 1e30), (names[1], 1.0))),
    }
    out = {}
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        want = [list((await stub.Generate(v, timeout=120)).token_ids) for v in victims]
        for kind, poison in kinds.items():
            calls = [_outcome(stub.Generate(poison, timeout=120)) for _ in range(4)]
            calls += [_outcome(stub.Generate(v, timeout=120)) for v in victims]
            got = await asyncio.gather(*calls)
            ok = sum(isinstance(r, pb.GenerateResponse) and list(r.token_ids) == w for r, w in zip(got[4:], want))
            codes = sorted({r.name if isinstance(r, grpc.StatusCode) else "OK" for r in got[:4]})
            out[kind] = {"poison": ",".join(codes), "victims_ok": f"{ok}/4"}
    return out


def _poisonous_adapter(stub, pb, root: Path, template: str) -> dict:
    """An adapter with lora_alpha = 1e30 (its weights otherwise those of `template`)."""
    shutil.copytree(root / template, root / "alpha-1e30")
    config_path = root / "alpha-1e30" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "lora_alpha": 1e30}))
    t0 = time.monotonic()
    try:
        stub.Generate(pb.GenerateRequest(prompt="fox", adapter="alpha-1e30", sampling=pb.SamplingParams(
            max_tokens=4, temperature=1.0)), timeout=120)
        return {"status": "OK", "seconds": round(time.monotonic() - t0, 3)}
    except grpc.RpcError as e:
        return {"status": e.code().name, "seconds": round(time.monotonic() - t0, 3), "message": e.details()[:200]}


async def _outcome(call):
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        return e.code()


def _merge_seconds(stub, pb, names: list[str]) -> dict:
    out = {}
    for n in (2, 4, 8):
        mix = pb.Mix(method="ties", adapters=[pb.WeightedAdapter(name=a, weight=1.0 / n) for a in names[:n]])
        mix.params["density"].number = 0.5
        t0 = time.monotonic()
        try:
            r = stub.Generate(pb.GenerateRequest(prompt="fox", mix=mix, sampling=pb.SamplingParams(max_tokens=1)),
                              timeout=600)
            out[f"ties x{n}"] = {"merge_seconds": round(r.resolution.merge_seconds, 2),
                                 "request_seconds": round(time.monotonic() - t0, 2)}
        except grpc.RpcError as e:
            out[f"ties x{n}"] = {"status": e.code().name, "seconds": round(time.monotonic() - t0, 2),
                                 "message": e.details()[:160]}
    return out


def _shutdown(base_dir: Path, root: Path, adapter: str, args: argparse.Namespace) -> dict:
    """SIGTERM to a `loramux serve` process, a second after the first of
    `--shutdown-streams` streams of `--shutdown-max-tokens` tokens started: seconds to
    exit, and how each stream ended."""
    from loramux_api.v1 import loramux_pb2 as pb
    from loramux_api.v1 import loramux_pb2_grpc as pb_grpc

    with tempfile.TemporaryDirectory(prefix="loramux-shutdown-") as tmp:
        port_file = Path(tmp) / "ports"
        proc = subprocess.Popen(
            [sys.executable, "-m", "loramux.cli", "serve", "--model", str(base_dir), "--adapter-root", str(root),
             "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--port-file", str(port_file),
             "--grace-seconds", str(args.grace_seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            t_start = time.monotonic()
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() - t_start > 300:
                    raise RuntimeError("the server did not start")
                time.sleep(0.1)
            address = f"127.0.0.1:{int(port_file.read_text().split()[0])}"
            endings, first = [], threading.Event()

            def stream(k: int) -> None:
                request = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
                    max_tokens=args.shutdown_max_tokens, ignore_eos=True), **({"adapter": adapter} if k % 2 else {}))
                last = None
                try:
                    with grpc.insecure_channel(address) as ch:
                        for last in pb_grpc.InferenceStub(ch).GenerateStream(request, timeout=600):
                            first.set()
                    endings.append("OK")
                except grpc.RpcError as e:
                    final = last is not None and last.HasField("result")
                    endings.append(f"{e.code().name}{' after a final message' if final else ''}")

            threads = [threading.Thread(target=stream, args=(k,)) for k in range(args.shutdown_streams)]
            for t in threads:
                t.start()
            if not first.wait(timeout=300):
                raise RuntimeError(f"no stream started: {endings}")
            time.sleep(1.0)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=args.grace_seconds + 120)
            exit_seconds = time.monotonic() - t0
            for t in threads:
                t.join(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    counts = {e: endings.count(e) for e in sorted(set(endings))}
    return {"grace_seconds": args.grace_seconds, "exit_seconds": round(exit_seconds, 2), "exit_code": code,
            "streams": counts}


def run(args: argparse.Namespace) -> dict:
    from loramux.config import ModelConfig
    from loramux.model.loader import ensure_default_model
    from loramux_api.v1 import loramux_pb2 as pb
    from loramux_api.v1 import loramux_pb2_grpc as pb_grpc

    base_dir = Path(args.model) if args.model else ensure_default_model(ModelConfig().cache_dir)
    with tempfile.TemporaryDirectory(prefix="loramux-robust-") as tmp:
        root = Path(tmp)
        names = make_adapters(base_dir, root, 8, 16)
        with _server(base_dir, root) as srv:
            report = {"head_of_line": asyncio.run(_head_of_line(srv.address, pb, pb_grpc, args.streams,
                                                                args.long_tokens))}
            with grpc.insecure_channel(srv.address) as ch:
                stub = pb_grpc.InferenceStub(ch)
                report["oversized_prompt_refused_seconds"] = _oversized(stub, pb)
                report["poison"] = asyncio.run(_poison(srv.address, pb, pb_grpc, names))
                report["poisonous_adapter"] = _poisonous_adapter(stub, pb, root, names[2])
                report["mix_merge"] = _merge_seconds(stub, pb, names)
            state = srv.server.state
            report["idle_after"] = state.runner.outstanding == 0 and state.engine.info().kv.used == 0
        if args.shutdown_streams:
            report["shutdown"] = _shutdown(base_dir, root, names[0], args)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--long-tokens", type=int, default=4000)
    p.add_argument("--shutdown-streams", type=int, default=8, help="0: skip the shutdown measurement")
    p.add_argument("--shutdown-max-tokens", type=int, default=2000)
    p.add_argument("--grace-seconds", type=float, default=30.0)
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Robustness figures on the default model, against a real server on loopback:

    python -m loramux.benchmarks.robustness [--streams 4] [--long-tokens 4000]

- head of line: `--streams` greedy streams decode while one `--long-tokens` prompt
  arrives; the largest gap between two tokens of a running stream, against their
  median gap (chunked prefill keeps it near one step);
- oversized prompt: seconds until a 3.9 MB prompt is refused;
- poison: four requests of each poisonous kind sent beside four victims (base,
  adapter, sampled adapter, mix); victims answered OK with their quiet-server
  tokens, and whether the server goes idle after;
- mix merge: seconds a request waits for a dense (ties) mix of two rank-16
  adapters that is not merged yet, as the response's merge_seconds reports it.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
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
                report["mix_merge"] = _merge_seconds(stub, pb, names)
            state = srv.server.state
            report["idle_after"] = state.runner.outstanding == 0 and state.engine.info().kv.used == 0
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--long-tokens", type=int, default=4000)
    args = p.parse_args(argv)
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

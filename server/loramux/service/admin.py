"""loramux.v1.Admin: adapters, named merges, pin/unpin, export, server info."""

from __future__ import annotations

import loramux
from loramux.adapters.naming import validate_adapter_name
from loramux.engine.engine import selection_label
from loramux.engine.types import GenerationRequest
from loramux.errors import FailedPrecondition, InvalidArgument
from loramux.merging import export
from loramux.merging.methods import METHODS
from loramux.service import convert
from loramux.service.handlers import ServerState, unary
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, state: ServerState):
        self.state = state

    # ---- adapters ------------------------------------------------------------

    @unary("ListAdapters")
    async def ListAdapters(self, request, context):
        st = self.state.ready()
        # Off the event loop: listing reads the adapter roots' directories.
        adapters = await st.runner.call(st.engine.list_adapters)
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info(a) for a in adapters])

    @unary("LoadAdapter")
    async def LoadAdapter(self, request, context):
        st = self.state.ready()
        await st.runner.call(st.engine.load_adapter, request.name, request.keep)
        listed = st.engine.list_adapters()
        info = next((a for a in listed if a.name == request.name and a.cached), None)
        if info is None:  # evicted again at once: the cache is too small for it
            raise FailedPrecondition(f"adapter {request.name!r} loaded but was evicted at once")
        return convert.adapter_info(info)

    @unary("UnloadAdapter")
    async def UnloadAdapter(self, request, context):
        engine = self.state.ready().engine
        validate_adapter_name(request.name)
        engine.unload_adapter(request.name)
        return pb.UnloadAdapterResponse()

    # ---- named merges --------------------------------------------------------

    @unary("CreateMerge")
    async def CreateMerge(self, request, context):
        st = self.state.ready()
        spec = convert.mix_spec(request.mix)
        report = await st.runner.call(st.engine.create_merge, request.name, spec, request.replace)
        return convert.merge_info(request.name, spec, report)

    @unary("ListMerges")
    async def ListMerges(self, request, context):
        merges = self.state.ready().engine.list_merges()
        return pb.ListMergesResponse(merges=[convert.merge_info(n, s, report) for n, s, report in merges])

    @unary("DeleteMerge")
    async def DeleteMerge(self, request, context):
        self.state.ready().engine.delete_merge(request.name)
        return pb.DeleteMergeResponse()

    # ---- pinning -------------------------------------------------------------

    @unary("Pin")
    async def Pin(self, request, context):
        st = self.state.ready()
        selection = GenerationRequest(prompt="", **convert.selection(request))
        if selection.adapter is None and selection.merge is None and selection.mix is None:
            raise InvalidArgument("pin needs an adapter, a merge name or a mix")
        async with st.weights_lock:
            deltas = await st.runner.call(st.engine.exact_deltas, selection)
            label = selection_label(selection)
            seconds = await st.runner.swap(deltas, label)
        st.metrics.observe_swap("pin", seconds, label)
        return pb.PinResponse(pinned=label, swap_seconds=seconds)

    @unary("Unpin")
    async def Unpin(self, request, context):
        st = self.state.ready()
        async with st.weights_lock:
            if st.engine.pinned is None:
                raise FailedPrecondition("nothing is pinned")
            seconds = await st.runner.swap(None, None)
        st.metrics.observe_swap("unpin", seconds, None)
        return pb.PinResponse(pinned="", swap_seconds=seconds)

    # ---- export --------------------------------------------------------------

    @unary("Export")
    async def Export(self, request, context):
        st = self.state.ready()
        if st.export_root is None:
            raise FailedPrecondition("export is off; start the server with --export-root DIR")
        validate_adapter_name(request.destination)
        out_dir = st.export_root / request.destination
        if request.WhichOneof("source") == "pinned_model":
            async with st.weights_lock:
                if st.engine.pinned is None:
                    raise FailedPrecondition("nothing is pinned; pin a merge before exporting the model")
                report = await st.runner.call(export.export_pinned, st.engine, out_dir)
        else:
            selection = GenerationRequest(prompt="", **convert.selection(request))
            if selection.adapter is None and selection.merge is None and selection.mix is None:
                raise InvalidArgument("export needs an adapter, a merge, a mix or pinned_model")
            report = await st.runner.call(export.export_selection, st.engine, selection, out_dir)
        return pb.ExportResponse(
            path=str(report.path), bytes=report.bytes, rank=report.rank,
            relative_error=report.relative_error,
        )

    # ---- info ----------------------------------------------------------------

    @unary("ServerInfo")
    async def ServerInfo(self, request, context):
        st = self.state.ready()
        info, usage = st.engine.info(), st.runner.usage
        host, merges, kv = info.host_cache, info.merge_cache, info.kv
        return pb.ServerInfoResponse(
            version=loramux.__version__,
            base_model=info.base_model,
            model_fingerprint=info.model_fingerprint,
            device=info.device,
            dtype=info.dtype,
            quantization=info.quantization,
            pinned=info.pinned or "",
            adapter_cache=convert.cache_usage(host.capacity_bytes, host.bytes_used, host.count),
            merge_cache=convert.cache_usage(merges.capacity_bytes, merges.bytes_used, merges.count),
            device_slots=info.slots.num_slots,
            device_slots_used=info.slots.used,
            max_rank=info.slots.max_rank,
            running_requests=usage.running,
            waiting_requests=usage.waiting,
            max_batch_rows=info.max_batch_rows,
            merge_methods=sorted(METHODS),
            kv_cache=convert.cache_usage(kv.capacity_bytes, kv.capacity_bytes * kv.used // max(kv.blocks, 1), kv.used),
            kv_blocks=kv.blocks,
            kv_block_size=kv.block_size,
            max_batch_tokens=info.max_batch_tokens,
        )

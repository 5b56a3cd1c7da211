"""loramux.v1.Inference: Generate and GenerateStream."""

from __future__ import annotations

from loramux.service import convert
from loramux.service.handlers import ServerState, streaming, unary
from loramux.service.runner import RequestStream, ShutdownCut
from loramux_api.v1 import loramux_pb2 as pb
from loramux_api.v1 import loramux_pb2_grpc as pb_grpc


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def _start(self, request: pb.GenerateRequest) -> tuple[RequestStream, str | None]:
        runner = self.state.ready().runner
        engine_request, caller_id = convert.generation_request(request)
        return await runner.submit(engine_request), caller_id

    @unary("Generate")
    async def Generate(self, request, context):
        stream, caller_id = await self._start(request)
        try:
            async for event in stream:
                if event.result is not None:
                    return convert.generate_response(event.result, caller_id)
        finally:
            stream.cancel()  # a no-op once finished; frees the row if the call ended early

    @streaming("GenerateStream")
    async def GenerateStream(self, request, context):
        stream, caller_id = await self._start(request)
        try:
            async for event in stream:
                msg = pb.GenerateStreamResponse(text=event.text)
                if event.token_id is not None:
                    msg.token_ids.append(event.token_id)
                if event.result is not None:
                    msg.result.CopyFrom(convert.generate_response(event.result, caller_id))
                if msg.text or msg.token_ids or event.result is not None:
                    yield msg
        except ShutdownCut as cut:
            # The last message says where the stream ended; the status says why.
            yield pb.GenerateStreamResponse(result=convert.generate_response(cut.result, caller_id))
            raise
        finally:
            stream.cancel()

"""The gRPC edge: protobuf ⇄ domain types, the engine thread, auth, metrics, serving."""

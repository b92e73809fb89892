"""Wire constants both sides agree on."""

MAX_MESSAGE_BYTES = 4 << 20   # gRPC's default message limit, kept on both ends
CHUNK_BYTES = 1 << 20         # payloads stream in chunks well under MAX_MESSAGE_BYTES

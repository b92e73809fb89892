"""Wire constants both sides agree on, and the one helper that clips client text."""

MAX_MESSAGE_BYTES = 4 << 20   # gRPC's default message limit, kept on both ends
CHUNK_BYTES = 1 << 20         # payloads stream in chunks well under MAX_MESSAGE_BYTES

# Anything a client sent (a parameter name, a metric name, ...) is echoed into a status
# message or a log line at most this many characters long (before escaping).
MAX_ECHO_CHARS = 64
# A status message is cut to this length whatever it holds: gRPC carries it in a trailer
# that must fit the peer's metadata limit (8 KiB by default), or the refusal is lost.
MAX_STATUS_CHARS = 1024


def clip(text, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, with how much was cut: the one way
    client-supplied text goes into an error message or a log line."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}...(+{len(s) - limit} chars)"


def clip_status(message: str, limit: int = MAX_STATUS_CHARS) -> str:
    """A status message cut to ``limit`` characters (the last line of defence)."""
    return message if len(message) <= limit else message[:limit - 20] + f"...(+{len(message) - limit + 20} chars)"

"""Reading a request body within ``max_request_bytes``, for every protocol."""

from fastapi import Request

from deployments.errors import PayloadTooLarge
from deployments.settings import limits


def check_declared_length(request: Request) -> None:
    """Refuse a body whose Content-Length is over the limit before reading it."""
    lim = limits()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > lim.max_request_bytes:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {lim.max_request_bytes} bytes")


async def read_bytes(request: Request) -> bytes:
    """The whole body, within ``max_request_bytes``."""
    check_declared_length(request)
    body = await request.body()
    if len(body) > limits().max_request_bytes:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {limits().max_request_bytes} bytes")
    return body

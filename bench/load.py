"""A small keep-alive HTTP/1.1 load driver on raw asyncio streams (much lighter than an HTTP
client library, so the driver is not the bottleneck). Reads its spec as JSON on stdin and
prints one JSON result line."""

from __future__ import annotations

import asyncio
import json
import sys
import time


def build_requests(spec: dict) -> list[bytes]:
    """Every request this driver sends, built up front: GETs, or POSTs cycling through the
    given bodies."""
    method = spec.get("method", "GET")
    head = f"{method} {spec['path']} HTTP/1.1\r\nHost: bench\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in spec["headers"].items())
    bodies = spec.get("bodies")
    if not bodies:
        return [(head + "\r\n").encode()]
    return [
        (
            head + f"content-type: application/json\r\ncontent-length: {len(b.encode())}\r\n\r\n"
        ).encode()
        + b.encode()
        for b in bodies
    ]


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[bool, float]:
    """Sends one built request on a keep-alive connection and reads the whole response:
    (a 200/201 came back, seconds taken)."""
    started = time.perf_counter()
    writer.write(request)
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    elapsed = time.perf_counter() - started
    return status_line.startswith((b"HTTP/1.1 200", b"HTTP/1.1 201")), elapsed


async def _worker(
    spec: dict, stop_at: float, latencies: list[float], errors: list[int], offset: int = 0
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", spec["port"])
    requests = spec["_requests"]
    n = offset
    try:
        while time.perf_counter() < stop_at:
            request = requests[n % len(requests)]
            n += 1
            ok, elapsed = await roundtrip(reader, writer, request)
            latencies.append(elapsed)
            if not ok:
                errors.append(1)
    finally:
        writer.close()


async def main(spec: dict) -> dict:
    spec["_requests"] = build_requests(spec)
    warmup = time.perf_counter() + 1.0
    await asyncio.gather(*(_worker(spec, warmup, [], []) for _ in range(spec["connections"])))
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    stop_at = started + spec["seconds"]
    step = max(1, len(spec["_requests"]) // spec["connections"])
    await asyncio.gather(
        *(_worker(spec, stop_at, latencies, errors, i * step) for i in range(spec["connections"]))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "seconds": elapsed,
        "errors": len(errors),
        "p50_ms": latencies[n // 2] * 1000 if n else 0.0,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
    }


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(main(json.loads(sys.stdin.read())))))

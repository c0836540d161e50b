"""The process that evaluates tenants' jq: it sees its input and nothing else.

Started by app/kit/sandbox.py as `python -I -B jq_child.py` with an empty environment, in
an empty working directory, with no inherited file descriptors but its pipes, stderr on
/dev/null. It imports only the standard library and jq, so it holds none of the service's
settings, keys or connections. Before reading any request it clears what is left of its
environment, asks the kernel to end it with its parent, lowers its CPU priority, caps its
memory and its file writes, and refuses jq's module system (the only way jq reads a file)
before compiling; each request gets a CPU-time limit of its own as a backstop.

Protocol on stdin/stdout, one request at a time: a frame is a 4-byte big-endian length and
that many bytes. A request's bytes are lines: a JSON header `{"p": [programs], "n":
outputs wanted, "o": one output's byte limit, "t": the whole reply's, "c": CPU seconds
the request may use}` and then one compact JSON document per line
(compact JSON has no raw newline). The reply is a JSON list with, per document, a list with
per program `[1, [outputs...]]` or `[0, "message"]`.

This module is also imported by the service for `module_directive` (one rule, two places).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

_MESSAGE_LIMIT = 500
_COMPILED_CACHE = 2048

# jq's module directives may only open a program: `module {...};`, `import "..." as x;`,
# `include "...";`. Comments and whitespace may come first.
_LEADING = re.compile(r"(?:\s+|#[^\n]*(?:\n|$))*")
_DIRECTIVE = re.compile(r"(module|import|include)\b")


def module_directive(program: str) -> str | None:
    """The module directive the program opens with (`import`, `include`, `module`), or None.
    Programs that use jq's module system are refused: modules are files."""
    start = _LEADING.match(program)
    found = _DIRECTIVE.match(program, start.end() if start else 0)
    return found.group(1) if found else None


def _message(exc: BaseException) -> str:
    """jq's message on one line, without its "jq: error:" framing."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.removeprefix("jq: error: ").strip().rstrip(":")[:_MESSAGE_LIMIT]


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent goes (a service that crashed or
    was killed must not leave a tenant's endless loop running)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent was gone before the request took effect
        os._exit(0)


def _cpu_budget(seconds: float) -> None:
    """Whatever the parent does, one request may use at most about `seconds` more of CPU:
    past it the kernel ends the process (SIGXCPU)."""
    try:
        import resource

        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    except (ImportError, ValueError, OSError):
        pass


def _confine() -> None:
    """Drop what the process could reveal or abuse before any tenant program runs."""
    _die_with_parent()
    os.environ.clear()
    try:
        # Below the service's own processes: a tenant's loop takes spare CPU, not the
        # API's or the worker's. The priority is given (the parent may have set it already,
        # or lowered it further): never raised here, and not lowered twice.
        wanted = int(sys.argv[1]) if len(sys.argv) > 1 else os.getpriority(os.PRIO_PROCESS, 0) + 10
        if os.getpriority(os.PRIO_PROCESS, 0) < wanted:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, wanted))
    except (OSError, ValueError):
        pass
    try:
        import resource

        for limit, value in (
            (resource.RLIMIT_AS, 1024 * 1024 * 1024),  # memory
            (resource.RLIMIT_FSIZE, 0),  # no file writes
            (resource.RLIMIT_CORE, 0),  # no core dumps of tenant data
        ):
            _soft, hard = resource.getrlimit(limit)
            capped = value if hard == resource.RLIM_INFINITY else min(hard, value)
            resource.setrlimit(limit, (capped, hard))
    except (ImportError, ValueError, OSError):
        pass


class _Evaluator:
    def __init__(self) -> None:
        import jq

        self._jq = jq
        self._compiled: dict[str, Any] = {}

    def program(self, text: str) -> Any:
        program = self._compiled.get(text)
        if program is None:
            directive = module_directive(text)
            if directive is not None:
                raise ValueError(f"jq modules are not available ({directive})")
            if len(self._compiled) >= _COMPILED_CACHE:
                self._compiled.clear()
            program = self._compiled[text] = self._jq.compile(text)
        return program

    def run(self, text: str, document: str, wanted: int, limit: int) -> list[Any]:
        try:
            program = self.program(text)
            outputs: list[Any] = []
            for value in program.input_text(document):
                if len(json.dumps(value)) > limit:
                    return [0, f"the result is larger than {limit} bytes"]
                outputs.append(value)
                if len(outputs) >= wanted:
                    break
            return [1, outputs]
        except Exception as exc:
            return [0, _message(exc)]

    def request(self, payload: bytes) -> bytes:
        lines = payload.decode().split("\n")
        header = json.loads(lines[0])
        programs: list[str] = header["p"]
        wanted = int(header["n"])
        limit = int(header["o"])
        _cpu_budget(float(header["c"]))
        room = int(header["t"])  # bytes of outputs the whole reply may carry
        reply: list[list[list[Any]]] = []
        for document in lines[1:]:
            row = []
            for text in programs:
                if room <= 0:
                    row.append([0, "the evaluation's results are larger than allowed"])
                    continue
                outcome = self.run(text, document, wanted, min(limit, room))
                if outcome[0]:
                    room -= sum(len(json.dumps(value)) for value in outcome[1])
                row.append(outcome)
            reply.append(row)
        return json.dumps(reply, separators=(",", ":")).encode()


def _read_exact(stream: Any, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def main() -> None:
    _confine()
    evaluator = _Evaluator()
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = _read_exact(source, 4)
        if head is None:
            return
        payload = _read_exact(source, int.from_bytes(head, "big"))
        if payload is None:
            return
        reply = evaluator.request(payload)
        sink.write(len(reply).to_bytes(4, "big") + reply)
        sink.flush()


if __name__ == "__main__":
    main()

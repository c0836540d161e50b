"""Port's `{{ jq }}` templates: invocation payloads rendered against a run's trigger data.

A string that is exactly one template (`"{{ .inputs.count }}"`, whitespace around allowed)
becomes the jq result with its JSON type; a string mixing text and templates becomes a
string, each result interpolated (strings as they are, null as "", anything else as
compact JSON). jq's first output is the value; no output is null. Dict keys may be
templates too: a key that evaluates to null drops its pair, and the key
`"{{ spreadValue() }}"` merges its value (an object, or null for nothing) into the parent.
Other scalars pass through.

jq runs in C and cannot be interrupted from Python, so templates are evaluated by a few
child processes, one render per round trip (every distinct expression of the value at
once; compiled programs are cached in the child). A child that runs past the time limit
is killed and replaced, so a runaway template fails alone and never holds up the worker.
Children see no environment variables (`env`, `$ENV`), live under a memory limit, and
cannot load jq modules. Errors are `TemplateError`s naming the JSON pointer of the value
that failed; secret values in jq's messages are masked.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import pydantic_core

TIME_LIMIT_SECONDS = 2.0
OUTPUT_LIMIT_BYTES = 1024 * 1024  # one template's result, as JSON
MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024  # a child's address space
_CHILDREN = 2
_COMPILED_CACHE = 2048
_MESSAGE_LIMIT = 500

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_SPREAD = re.compile(r"\s*\{\{\s*spreadValue\(\)\s*\}\}\s*", re.S)
_SECRET = re.compile(
    r"""(?<![\w\])"?])\.secrets\s*\??\s*(?:
        \.\s*([A-Za-z_][A-Za-z0-9_]*)           # .secrets.NAME
      | \.?\s*\[\s*"((?:[^"\\]|\\.)*)"\s*\]     # .secrets["NAME"]
      | \.?\s*\[\s*'([^']*)'\s*\]               # .secrets['NAME']
      | \.\s*"((?:[^"\\]|\\.)*)"                # .secrets."NAME"
    )""",
    re.X,
)
_MASK = "***"


class TemplateError(Exception):
    """A template that could not be rendered: where (a JSON pointer) and why."""

    def __init__(self, pointer: str, message: str) -> None:
        super().__init__(f"{pointer}: {message}" if pointer else message)
        self.pointer = pointer
        self.message = message


# ---------------------------------------------------------------------------------------
# Parsing


def _expressions(text: str) -> list[str]:
    return [match.group(1).strip() for match in _TEMPLATE.finditer(text)]


def _single(text: str) -> str | None:
    """The expression when the string is exactly one template (whitespace around)."""
    matches = list(_TEMPLATE.finditer(text))
    if len(matches) != 1:
        return None
    match = matches[0]
    if text[: match.start()].strip() or text[match.end() :].strip():
        return None
    return match.group(1).strip()


def _escape(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _collect(value: Any, pointer: str, found: dict[str, str]) -> None:
    """Every distinct expression of the value, with the pointer where it first appears."""
    if isinstance(value, str):
        for expression in _expressions(value):
            found.setdefault(expression, pointer)
    elif isinstance(value, dict):
        for key, item in value.items():
            at = f"{pointer}/{_escape(key)}"
            if isinstance(key, str) and not _SPREAD.fullmatch(key):
                for expression in _expressions(key):
                    found.setdefault(expression, at)
            _collect(item, at, found)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _collect(item, f"{pointer}/{index}", found)


def referenced_secrets(value: Any) -> set[str]:
    """The secret names the templates of a value read (`.secrets.NAME`, `.secrets["NAME"]`,
    `.secrets['NAME']`, `.secrets."NAME"`), so a run can fail before rendering when one is
    not defined."""
    found: dict[str, str] = {}
    _collect(value, "", found)
    names: set[str] = set()
    for expression in found:
        for match in _SECRET.finditer(expression):
            plain, double, single, quoted = match.groups()
            if plain is not None or single is not None:
                names.add(plain if plain is not None else single)
                continue
            raw = double if double is not None else quoted
            try:
                names.add(json.loads(f'"{raw}"'))
            except ValueError:
                names.add(raw)
    return names


def redact(text: str, secrets: Iterable[str]) -> str:
    """The text with every secret value masked, including the truncated forms jq prints
    in its error messages ("abcdefghij...")."""
    for secret in sorted((s for s in secrets if isinstance(s, str)), key=len, reverse=True):
        if len(secret) < 4:
            continue
        text = text.replace(secret, _MASK)
        for end in range(len(secret) - 1, min(6, len(secret)) - 1, -1):
            text = text.replace(secret[:end] + "...", _MASK + "...")
    return text


# ---------------------------------------------------------------------------------------
# The child processes


_compiled: dict[str, Any] = {}  # in a child: expression -> compiled jq program


def _prepare_child() -> None:
    """In a new child: no environment for `env`/`$ENV`, bounded memory, quiet stderr."""
    os.environ.clear()
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = (
            MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(hard, MEMORY_LIMIT_BYTES)
        )
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    # `debug` and `stderr` write here; a tenant's template does not reach the service log.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _jq_message(exc: Exception) -> str:
    """jq's message on one line, without its "jq: error:" framing."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = first.removeprefix("jq: error: ").strip().rstrip(":")
    return first[:_MESSAGE_LIMIT]


def _evaluate(expressions: list[str], document: str) -> list[tuple[bool, Any]]:
    """In a child: (True, first output or None) or (False, error message) per expression."""
    import jq

    out: list[tuple[bool, Any]] = []
    for expression in expressions:
        try:
            program = _compiled.get(expression)
            if program is None:
                if len(_compiled) >= _COMPILED_CACHE:
                    _compiled.clear()
                program = _compiled[expression] = jq.compile(expression)
            try:
                value = program.input_text(document).first()
            except StopIteration:
                value = None
            if len(json.dumps(value)) > OUTPUT_LIMIT_BYTES:
                out.append((False, f"the result is larger than {OUTPUT_LIMIT_BYTES} bytes"))
                continue
            out.append((True, value))
        except Exception as exc:
            out.append((False, _jq_message(exc)))
    return out


def _child_main(conn: Connection) -> None:
    """A child's loop: requests in, results out, until the parent closes the pipe."""
    _prepare_child()
    while True:
        try:
            expressions, document = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_evaluate(expressions, document))


class _Child:
    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.conn = parent
        self.process: BaseProcess = context.Process(
            target=_child_main, args=(child,), name="portolan-templates", daemon=True
        )
        self.process.start()
        child.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class _TimeLimit(Exception):
    pass


class _Crashed(Exception):
    pass


class _Children:
    """A few children, each running one request at a time; a child that overruns the
    time limit or dies is discarded (and replaced on the next request)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._idle: list[_Child] = []
        self._count = 0
        self._changed = threading.Condition()

    def _acquire(self) -> _Child:
        with self._changed:
            while not self._idle and self._count >= self._size:
                self._changed.wait()
            while self._idle:
                child = self._idle.pop()
                if child.process.is_alive():
                    return child
                child.kill()  # died while idle (e.g. the OOM killer): replace it
                self._count -= 1
            self._count += 1
        try:
            return _Child()
        except BaseException:
            self._forget()
            raise

    def _release(self, child: _Child) -> None:
        with self._changed:
            self._idle.append(child)
            self._changed.notify()

    def _forget(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify()

    def call(self, expressions: list[str], document: str) -> list[tuple[bool, Any]]:
        """Blocking: one round trip to an idle child, bounded by the time limit."""
        child = self._acquire()
        healthy = False
        try:
            child.conn.send((expressions, document))
            if not child.conn.poll(TIME_LIMIT_SECONDS):
                raise _TimeLimit
            result: list[tuple[bool, Any]] = child.conn.recv()
            healthy = True
            return result
        except (EOFError, OSError) as exc:
            raise _Crashed from exc
        finally:
            if healthy:
                self._release(child)
            else:
                child.kill()
                self._forget()

    def shutdown(self) -> None:
        with self._changed:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for child in idle:
            child.kill()


_children = _Children(_CHILDREN)
# Requests wait for a child here, not in the event loop's default executor (which also
# resolves host names).
_executor = ThreadPoolExecutor(max_workers=_CHILDREN, thread_name_prefix="portolan-templates")


def shutdown() -> None:
    """Stop the idle children (they are started again on demand)."""
    _children.shutdown()


async def _call(expressions: list[str], document: str) -> list[tuple[bool, Any]]:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor, _children.call, expressions, document)


# ---------------------------------------------------------------------------------------
# Rendering


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Renderer:
    def __init__(self, results: dict[str, tuple[bool, Any]], secrets: list[str]) -> None:
        self.results = results
        self.secrets = secrets

    def result(self, expression: str, pointer: str) -> Any:
        ok, value = self.results[expression]
        if not ok:
            raise TemplateError(pointer, "jq error: " + redact(str(value), self.secrets))
        return value

    def string(self, text: str, pointer: str) -> Any:
        single = _single(text)
        if single is not None:
            return self.result(single, pointer)

        def interpolate(match: re.Match[str]) -> str:
            value = self.result(match.group(1).strip(), pointer)
            if value is None:
                return ""
            return value if isinstance(value, str) else _compact(value)

        return _TEMPLATE.sub(interpolate, text)

    def value(self, value: Any, pointer: str) -> Any:
        if isinstance(value, str):
            return self.string(value, pointer)
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                at = f"{pointer}/{_escape(key)}"
                if isinstance(key, str) and _SPREAD.fullmatch(key):
                    spread = self.value(item, at)
                    if spread is None:
                        continue
                    if not isinstance(spread, dict):
                        kind = type(spread).__name__
                        raise TemplateError(at, f"spreadValue() needs an object, not {kind}")
                    out.update(spread)
                    continue
                name = self.string(key, at) if isinstance(key, str) else key
                if name is None:
                    continue
                if isinstance(key, str) and not isinstance(name, str):
                    name = _compact(name)
                out[name] = self.value(item, at)
            return out
        if isinstance(value, list | tuple):
            return [self.value(item, f"{pointer}/{index}") for index, item in enumerate(value)]
        return value


async def render(value: Any, data: dict[str, Any], pointer: str = "") -> Any:
    """The value with its templates evaluated against `data`; `pointer` prefixes the JSON
    pointers of errors (e.g. "/body"). Raises TemplateError."""
    found: dict[str, str] = {}
    _collect(value, pointer, found)
    raw_secrets = data.get("secrets")
    secrets = (
        [v for v in raw_secrets.values() if isinstance(v, str)]
        if isinstance(raw_secrets, dict)
        else []
    )
    results: dict[str, tuple[bool, Any]] = {}
    expressions = [e for e in found if e]
    for expression, at in found.items():
        if not expression:
            raise TemplateError(at, "jq error: the template is empty")
    if expressions:
        try:
            document = pydantic_core.to_json(data).decode()
        except pydantic_core.PydanticSerializationError as exc:
            raise TemplateError(pointer, f"the template data is not JSON: {exc}") from exc
        at = found[expressions[0]] if len(expressions) == 1 else pointer
        try:
            answers = await _call(expressions, document)
        except _TimeLimit as exc:
            raise TemplateError(
                at, f"jq error: evaluation ran longer than {TIME_LIMIT_SECONDS:g} s"
            ) from exc
        except _Crashed as exc:
            raise TemplateError(
                at, "jq error: evaluation stopped (out of memory or a crash)"
            ) from exc
        except OSError as exc:
            raise TemplateError(at, f"jq could not be started: {exc}") from exc
        results = dict(zip(expressions, answers, strict=True))
    return _Renderer(results, secrets).value(value, pointer)

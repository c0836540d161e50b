"""Performing one run's invocation: a signed webhook, a GitHub workflow dispatch, or a GitLab
pipeline trigger, from an invocation method whose templates are already rendered.

The answer is an `Outcome` for the caller to record: `success` or `failure` end the run
now (a synchronized webhook's answer, or a permanent failure such as a 4xx, a missing
token secret or a URL the outbound guard refuses); `accepted` means the backend took the
call and the run stays IN_PROGRESS until it reports; `retry` is a transient failure (a
timeout, a connection error, 408, 429, 5xx, GitHub's rate limit) with the server's
Retry-After when it gave one. An outcome's message is one line for the run's log and
never holds a secret value (the organization's secrets and the signing secret are
masked in it).

- WEBHOOK: `method` (POST by default) to `url` with the method's `headers`, the `body`
  serialised once to compact JSON and signed over exactly those bytes (app/dispatch/
  signing.py; the message id is the run id, so a receiver dedupes retries by
  `webhook-id`). Synchronized webhooks (`synchronized: true`) end the run from the
  status code and keep the response body.
- GITHUB: `POST {github_api_url}/repos/{org}/{repo}/actions/workflows/{workflow}/
  dispatches` with the token secret (`tokenSecret`, default GITHUB_TOKEN); the ref is
  `ref`, else `workflowInputs.ref`, else main; at most 25 inputs, objects and arrays sent
  as JSON strings, nulls dropped.
- GITLAB: `POST {gitlab_api_url}/projects/{group%2Fproject}/trigger/pipeline`,
  form-encoded, with the trigger token secret (`tokenSecret`, default
  GITLAB_TRIGGER_TOKEN), the ref (the run's `ref` input, else `defaultRef`, else main)
  and `pipelineVariables` (by default the run's inputs) as `variables[KEY]`.
"""

from __future__ import annotations

import json
import math
import re
import ssl
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

import httpx

from app.dispatch import signing
from app.dispatch.templates import redact
from app.kit import client as outbound_client
from app.kit import outbound
from app.kit.outbound import Allowed

RESPONSE_LIMIT_BYTES = 64 * 1024
GITHUB_MAX_INPUTS = 25
WEBHOOK_METHODS = frozenset({"POST", "PUT", "PATCH", "GET", "DELETE"})
_MESSAGE_LIMIT = 500
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass
class Outcome:
    """What one invocation came to (see the module docstring for the states)."""

    state: Literal["success", "failure", "accepted", "retry"]
    message: str
    link: str | None = None
    external_run_id: str | None = None
    response: Any = None
    status_code: int | None = None
    retry_after: float | None = None


@dataclass
class Context:
    """What an invocation needs besides its method: the run, the organization's secrets
    and signing secret, and the dispatch settings."""

    run_id: str
    signing_secret: str
    secrets: dict[str, str]
    allowed: Allowed
    github_api_url: str
    gitlab_api_url: str
    timeout: float
    inputs: dict[str, Any]
    client: outbound_client.Client | None = field(default=None, repr=False)

    async def send(
        self, method: str, url: str, headers: dict[str, str], content: bytes | None
    ) -> httpx.Response:
        sender = self.client if self.client is not None else outbound_client.shared()
        return await sender.send(
            method,
            url,
            headers=headers,
            content=content,
            allowed=self.allowed,
            timeout=self.timeout,
        )


class _Stop(Exception):
    """An invocation that ends before any call, with its outcome."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from Retry-After (a number or an HTTP date), if the response gave one."""
    raw = response.headers.get("retry-after", "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def _reason(response: httpx.Response) -> str:
    return f"{response.status_code} {response.reason_phrase}".strip()


def _snippet(response: httpx.Response, secrets: list[str], limit: int = 200) -> str:
    """The start of a response body on one line, secrets masked before it is cut."""
    text = response.content[:4096].decode("utf-8", "replace")
    return _one_line(redact(text, secrets), limit)


def _secret_values(ctx: Context) -> list[str]:
    return [*ctx.secrets.values(), ctx.signing_secret]


def _response_body(response: httpx.Response) -> Any:
    """A synchronized webhook's answer: JSON if it parses, else text, at most 64 KiB."""
    raw = response.content
    if not raw:
        return None
    if len(raw) <= RESPONSE_LIMIT_BYTES:
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw[:RESPONSE_LIMIT_BYTES].decode("utf-8", "replace")


def _secret(ctx: Context, method: dict[str, Any], default: str) -> str:
    name = method.get("tokenSecret") or default
    token = ctx.secrets.get(str(name))
    if not token:
        raise _Stop(f"secret {name} is not defined")
    return token


def _required(method: dict[str, Any], names: tuple[str, ...], kind: str) -> list[str]:
    values = [method.get(name) for name in names]
    missing = [n for n, v in zip(names, values, strict=True) if not isinstance(v, str) or not v]
    if missing:
        raise _Stop(f"the {kind} invocation needs {', '.join(missing)}")
    return [str(v) for v in values]


# ---------------------------------------------------------------------------------------
# WEBHOOK


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _webhook_headers(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _Stop("the webhook's headers must map names to values")
    headers: dict[str, str] = {}
    for name, value in raw.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else _compact(value)
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise _Stop(f"the webhook header name {str(name)[:100]!r} is not valid")
        if not text.isascii() or any(c in text for c in "\r\n\0"):
            raise _Stop(f"the value of webhook header {name} is not a valid header value")
        headers[name] = text
    return headers


async def _webhook(method: dict[str, Any], ctx: Context) -> Outcome:
    url = method.get("url")
    if not isinstance(url, str) or not url.strip():
        raise _Stop("the webhook has no url")
    verb = str(method.get("method") or "POST").upper()
    if verb not in WEBHOOK_METHODS:
        raise _Stop(
            f"the webhook method {verb[:20]} is not one of {', '.join(sorted(WEBHOOK_METHODS))}"
        )
    headers = _webhook_headers(method.get("headers"))
    body = method.get("body")
    try:
        content = _compact({} if body is None else body).encode()
    except (TypeError, ValueError) as exc:
        raise _Stop(f"the webhook body is not JSON: {exc}") from exc
    signed = signing.headers(ctx.signing_secret, ctx.run_id, int(time.time()), content)
    ours = {name.lower() for name in signed}
    headers = {name: value for name, value in headers.items() if name.lower() not in ours}
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/json"
    headers.update(signed)

    response = await ctx.send(verb, url.strip(), headers, content)
    status = response.status_code
    synchronized = _is_true(method.get("synchronized"))
    answer = _response_body(response) if synchronized else None

    def outcome(state: Literal["success", "failure", "accepted", "retry"], message: str) -> Outcome:
        return Outcome(
            state,
            message,
            response=answer,
            status_code=status,
            retry_after=_retry_after(response) if state == "retry" else None,
        )

    if 200 <= status < 300:
        if synchronized:
            return outcome("success", f"the webhook answered {_reason(response)}")
        return outcome("accepted", f"the webhook accepted the run ({_reason(response)})")
    if status in (408, 429) or status >= 500:
        return outcome("retry", f"the webhook answered {_reason(response)}")
    if 300 <= status < 400:
        return outcome(
            "failure", f"the webhook answered {_reason(response)}; redirects are not followed"
        )
    detail = _snippet(response, _secret_values(ctx))
    return outcome(
        "failure", f"the webhook answered {_reason(response)}" + (f": {detail}" if detail else "")
    )


# ---------------------------------------------------------------------------------------
# GITHUB


def _github_link(api_url: str, org: str, repo: str, workflow: str) -> str | None:
    """The workflow's page on github.com (None for GitHub Enterprise API bases)."""
    if (urlsplit(api_url).hostname or "").lower() != "api.github.com":
        return None
    parts = (quote(org, safe=""), quote(repo, safe=""), quote(workflow, safe=""))
    return "https://github.com/{}/{}/actions/workflows/{}".format(*parts)


def _github_inputs(method: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    raw = method.get("workflowInputs")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _Stop("workflowInputs must be an object")
    inputs = dict(raw)
    ref_input = inputs.pop("ref", None)
    ref = method.get("ref") or ref_input or "main"
    if not isinstance(ref, str):
        raise _Stop("the GitHub ref must be a string")
    sent: dict[str, Any] = {}
    for name, value in inputs.items():
        if value is None:
            continue
        sent[str(name)] = _compact(value) if isinstance(value, dict | list) else value
    if len(sent) > GITHUB_MAX_INPUTS:
        raise _Stop(
            f"GitHub accepts at most {GITHUB_MAX_INPUTS} workflow inputs; this run has {len(sent)}"
        )
    return ref, sent


def _github_message(response: httpx.Response, secrets: list[str]) -> str:
    data = _json(response)
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return " ".join(data["message"].split())
    return _snippet(response, secrets) or response.reason_phrase


async def _github(method: dict[str, Any], ctx: Context) -> Outcome:
    org, repo, workflow = _required(method, ("org", "repo", "workflow"), "GITHUB")
    token = _secret(ctx, method, "GITHUB_TOKEN")
    ref, inputs = _github_inputs(method)
    base = ctx.github_api_url.rstrip("/")
    url = (
        f"{base}/repos/{quote(org, safe='')}/{quote(repo, safe='')}"
        f"/actions/workflows/{quote(workflow, safe='')}/dispatches"
    )
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/vnd.github+json",
        "X-GitHub-Api-Version": "2022-11-28",
        "Content-Type": "application/json",
        "User-Agent": "portolan",
    }
    content = _compact({"ref": ref, "inputs": inputs}).encode()
    response = await ctx.send("POST", url, headers, content)
    status = response.status_code
    where = f"{org}/{repo} workflow {workflow}"
    if 200 <= status < 300:
        return Outcome(
            "accepted",
            f"dispatched GitHub workflow {workflow} on {org}/{repo} at {ref}",
            link=_github_link(ctx.github_api_url, org, repo, workflow),
            status_code=status,
        )
    message = _github_message(response, _secret_values(ctx))
    limited = response.headers.get("x-ratelimit-remaining") == "0"
    if status == 429 or (
        status == 403
        and (limited or "retry-after" in response.headers or "rate limit" in message.lower())
    ):
        wait = _retry_after(response)
        reset = response.headers.get("x-ratelimit-reset", "")
        if wait is None and limited and reset.isdigit():
            wait = max(0.0, int(reset) - time.time())
        return Outcome(
            "retry",
            f"GitHub's rate limit was reached ({status}: {message})",
            status_code=status,
            retry_after=wait,
        )
    if status == 408 or status >= 500:
        return Outcome(
            "retry",
            f"GitHub answered {status} for {where}: {message}",
            status_code=status,
            retry_after=_retry_after(response),
        )
    return Outcome(
        "failure", f"GitHub answered {status} for {where}: {message}", status_code=status
    )


# ---------------------------------------------------------------------------------------
# GITLAB


def _gitlab_message(response: httpx.Response, secrets: list[str]) -> str:
    data = _json(response)
    if isinstance(data, dict):
        found = data.get("message", data.get("error"))
        if isinstance(found, str):
            return " ".join(found.split())
        if isinstance(found, dict):
            parts = []
            for key, value in found.items():
                text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
                parts.append(f"{key}: {text}")
            return " ".join("; ".join(parts).split())
        if isinstance(found, list):
            return " ".join(", ".join(map(str, found)).split())
    return _snippet(response, secrets) or response.reason_phrase


def _gitlab_value(value: Any) -> str:
    return value if isinstance(value, str) else _compact(value)


async def _gitlab(method: dict[str, Any], ctx: Context) -> Outcome:
    group, project = _required(method, ("groupName", "projectName"), "GITLAB")
    token = _secret(ctx, method, "GITLAB_TRIGGER_TOKEN")
    path = f"{group.strip('/')}/{project.strip('/')}"
    input_ref = ctx.inputs.get("ref")
    ref = input_ref if isinstance(input_ref, str) and input_ref else None
    ref = ref or method.get("defaultRef") or "main"
    if not isinstance(ref, str):
        raise _Stop("the GitLab ref must be a string")
    variables = method.get("pipelineVariables")
    if variables is None:
        variables = ctx.inputs
    if not isinstance(variables, dict):
        raise _Stop("pipelineVariables must be an object")
    form = [("token", token), ("ref", ref)]
    form += [
        (f"variables[{key}]", _gitlab_value(v)) for key, v in variables.items() if v is not None
    ]
    base = ctx.gitlab_api_url.rstrip("/")
    url = f"{base}/projects/{quote(path, safe='')}/trigger/pipeline"
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
        "User-Agent": "portolan",
    }
    response = await ctx.send("POST", url, headers, urlencode(form).encode())
    status = response.status_code
    if 200 <= status < 300:
        data = _json(response)
        data = data if isinstance(data, dict) else {}
        web_url = data.get("web_url")
        pipeline = data.get("id")
        return Outcome(
            "accepted",
            f"triggered GitLab pipeline {pipeline} on {path} at {ref}",
            link=web_url if isinstance(web_url, str) else None,
            external_run_id=str(pipeline) if pipeline is not None else None,
            status_code=status,
        )
    message = _gitlab_message(response, _secret_values(ctx))
    if status in (408, 429) or status >= 500:
        return Outcome(
            "retry",
            f"GitLab answered {status} for {path}: {message}",
            status_code=status,
            retry_after=_retry_after(response),
        )
    hint = " (check the project path and the trigger token)" if status == 404 else ""
    return Outcome(
        "failure", f"GitLab answered {status} for {path}: {message}{hint}", status_code=status
    )


# ---------------------------------------------------------------------------------------


_INVOKERS = {
    "WEBHOOK": (_webhook, "the webhook"),
    "GITHUB": (_github, "the GitHub API"),
    "GITLAB": (_gitlab, "the GitLab API"),
}


def _transport(exc: httpx.HTTPError, what: str, timeout: float) -> Outcome:
    """The outcome of a call that got no answer."""
    if isinstance(exc, httpx.TimeoutException):
        return Outcome("retry", f"{what} timed out after {timeout:g} s")
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        if isinstance(current, BaseExceptionGroup):
            chain.extend(current.exceptions)
        current = current.__cause__ or current.__context__
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or (
        "CERTIFICATE_VERIFY_FAILED" in text
    ):
        return Outcome("failure", f"{what}'s TLS certificate could not be verified")
    if isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol):
        return Outcome("failure", f"the request to {what} could not be sent: {exc}")
    if isinstance(exc, httpx.ConnectError):
        lowered = text.lower()
        if "refused" in lowered or any(isinstance(e, ConnectionRefusedError) for e in chain):
            reason = "connection refused"
        elif "unreachable" in lowered:
            reason = "network unreachable"
        else:
            reason = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)) or "connection failed"
        return Outcome("retry", f"could not connect to {what}: {reason}")
    detail = str(exc) or type(exc).__name__
    return Outcome("retry", f"the call to {what} failed: {detail}")


async def invoke(method: dict[str, Any], ctx: Context) -> Outcome:
    """Perform a rendered WEBHOOK, GITHUB or GITLAB invocation method."""
    kind = method.get("type")
    entry = _INVOKERS.get(str(kind))
    if entry is None:
        outcome = Outcome("failure", f"invocation type {str(kind)[:40]} is not performed here")
    else:
        perform, what = entry
        try:
            outcome = await perform(method, ctx)
        except _Stop as stop:
            outcome = Outcome("failure", stop.message)
        except outbound.Refused as exc:
            outcome = Outcome("failure", f"{what} URL was refused: {exc}")
        except httpx.InvalidURL as exc:
            outcome = Outcome("failure", f"{what} URL is not valid: {exc}")
        except httpx.HTTPError as exc:
            outcome = _transport(exc, what, ctx.timeout)
    # Masked before it is cut to length, so no part of a secret survives the cut.
    outcome.message = _without_nul(_one_line(redact(outcome.message, _secret_values(ctx))))
    outcome.response = _without_nul(outcome.response)
    return outcome


def _without_nul(value: Any) -> Any:
    """The value with NUL characters replaced: PostgreSQL's text and jsonb cannot hold
    them, and a receiver's answer (kept as the run's response and log line) may."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value

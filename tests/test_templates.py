"""Port's `{{ jq }}` templates: types kept, interpolation, key templates, spreadValue,
errors with JSON pointers, the jq time limit, and the secrets a template references."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from app.dispatch.templates import TemplateError, redact, referenced_secrets, render
from app.kit import sandbox

ORG = "org-templates"
DATA: dict[str, Any] = {
    "inputs": {
        "name": "api",
        "count": 3,
        "ratio": 0.5,
        "enabled": True,
        "tags": ["a", "b"],
        "owner": {"team": "core", "size": 4},
        "nothing": None,
        "key": "region",
    },
    "run": {"id": "r_123"},
    "entity": {},
    "secrets": {"API_TOKEN": "tok-0123456789abcdef", "a-b": "dashed-secret-value"},
}


async def test_a_single_template_keeps_the_json_type() -> None:
    value = {
        "name": "{{ .inputs.name }}",
        "count": "{{ .inputs.count }}",
        "ratio": "{{.inputs.ratio}}",
        "enabled": "  {{ .inputs.enabled }}  ",
        "tags": "{{ .inputs.tags }}",
        "owner": "{{ .inputs.owner }}",
        "nothing": "{{ .inputs.nothing }}",
        "missing": "{{ .inputs.absent }}",
        "computed": "{{ .inputs.count * 2 + 1 }}",
    }
    assert await render(value, DATA, org=ORG) == {
        "name": "api",
        "count": 3,
        "ratio": 0.5,
        "enabled": True,
        "tags": ["a", "b"],
        "owner": {"team": "core", "size": 4},
        "nothing": None,
        "missing": None,
        "computed": 7,
    }


async def test_mixed_text_interpolates_each_result() -> None:
    value = (
        "svc={{ .inputs.name }} n={{ .inputs.count }} on={{ .inputs.enabled }} "
        "none=[{{ .inputs.nothing }}] tags={{ .inputs.tags }} owner={{ .inputs.owner }}"
    )
    assert await render(value, DATA, org=ORG) == (
        'svc=api n=3 on=true none=[] tags=["a","b"] owner={"team":"core","size":4}'
    )
    # Two templates side by side are a string, not one expression spanning both.
    assert await render("{{ .inputs.count }}{{ .inputs.count }}", DATA, org=ORG) == "33"
    assert await render("{{ .inputs.name }} and {{ .run.id }}", DATA, org=ORG) == "api and r_123"


async def test_non_strings_and_plain_strings_pass_through() -> None:
    value: dict[str, Any] = {
        "n": 1,
        "f": 2.5,
        "b": False,
        "z": None,
        "s": "no templates { here }",
        "l": [],
    }
    assert await render(value, DATA, org=ORG) == value
    out = await render(value, DATA, org=ORG)
    assert out is not value


async def test_nested_lists_and_objects_are_rendered() -> None:
    value = {
        "items": [
            "{{ .inputs.count }}",
            ["{{ .inputs.name }}", {"deep": "{{ .inputs.tags[1] }}"}],
            7,
        ]
    }
    assert await render(value, DATA, org=ORG) == {"items": [3, ["api", {"deep": "b"}], 7]}


async def test_key_templates_name_the_key_and_null_drops_the_pair() -> None:
    value = {
        "{{ .inputs.key }}": "eu-west-1",
        "{{ .inputs.nothing }}": "dropped",
        '{{ if .inputs.enabled then "on" else null end }}': "{{ .inputs.count }}",
        "prefix-{{ .inputs.name }}": 1,
        "{{ .inputs.count }}": "number keys become strings",
        # A dropped pair's value is not evaluated, so its error does not matter.
        "{{ null }}": '{{ error("never seen") }}',
    }
    assert await render(value, DATA, org=ORG) == {
        "region": "eu-west-1",
        "on": 3,
        "prefix-api": 1,
        "3": "number keys become strings",
    }


async def test_spread_value_merges_an_object_into_its_parent() -> None:
    value = {
        "before": 1,
        "{{ spreadValue() }}": "{{ .inputs.owner }}",
        "after": "{{ .run.id }}",
        "nested": {"{{ spreadValue() }}": {"literal": "{{ .inputs.name }}"}, "x": 0},
    }
    assert await render(value, DATA, org=ORG) == {
        "before": 1,
        "team": "core",
        "size": 4,
        "after": "r_123",
        "nested": {"literal": "api", "x": 0},
    }
    assert await render({"{{ spreadValue() }}": "{{ null }}", "a": 1}, DATA, org=ORG) == {"a": 1}
    with pytest.raises(TemplateError) as info:
        await render({"body": {"{{ spreadValue() }}": "{{ .inputs.tags }}"}}, DATA, org=ORG)
    assert info.value.pointer == "/body/{{ spreadValue() }}"
    assert "spreadValue() needs an object" in str(info.value)


async def test_jq_output_rules() -> None:
    assert await render("{{ empty }}", DATA, org=ORG) is None
    assert await render("{{ .inputs.tags[] }}", DATA, org=ORG) == "a"  # the first output
    assert await render('{{ 1, error("later") }}', DATA, org=ORG) == 1
    assert await render("{{ .inputs.tags | length }}", DATA, org=ORG) == 2


async def test_compile_and_runtime_errors_name_the_pointer() -> None:
    with pytest.raises(TemplateError) as info:
        await render({"name": "{{ .inputs.name | }}"}, DATA, "/body", org=ORG)
    assert info.value.pointer == "/body/name"
    assert str(info.value).startswith("/body/name: jq error: syntax error")
    assert "\n" not in str(info.value)

    with pytest.raises(TemplateError) as info:
        await render(
            {"a/b": {"c~d": ["ok", "x {{ .inputs.name | tonumber }}"]}}, DATA, "/url", org=ORG
        )
    assert info.value.pointer == "/url/a~1b/c~0d/1"
    assert "jq error: " in str(info.value) and "cannot be parsed as a number" in str(info.value)

    with pytest.raises(TemplateError) as info:
        await render({"{{ .inputs.name | keys }}": 1}, DATA, org=ORG)
    assert info.value.pointer == "/{{ .inputs.name | keys }}"

    with pytest.raises(TemplateError, match="the template is empty"):
        await render({"x": "{{ }}"}, DATA, org=ORG)

    with pytest.raises(TemplateError) as info:
        await render("{{ .inputs.count | error }}", DATA, org=ORG)
    assert str(info.value) == "jq error: 3"


async def test_error_messages_mask_secret_values() -> None:
    with pytest.raises(TemplateError) as info:
        await render({"h": "{{ .secrets.API_TOKEN | tonumber }}"}, DATA, org=ORG)
    assert "tok-0123456789abcdef" not in str(info.value)
    assert "tok-01234" not in str(info.value)  # jq's truncated form is masked too
    assert "***" in str(info.value)
    with pytest.raises(TemplateError) as info:
        await render({"h": "{{ . | error }}"}, DATA, org=ORG)
    assert "tok-0123456789abcdef" not in str(info.value)
    assert "dashed-secret-value" not in str(info.value)
    assert redact("a dashed-se... b", ["dashed-secret-value"]) == "a ***... b"


@pytest.mark.parametrize("program", ["def f: f; f", "[repeat(1)]", "last(range(1e12))"])
async def test_runaway_jq_ends_in_an_error_within_the_time_limit(program: str) -> None:
    await render("{{ 1 }}", DATA, org=ORG)  # a child is up
    started = time.monotonic()
    with pytest.raises(TemplateError) as info:
        await render({"body": {"x": "{{ " + program + " }}"}}, DATA, org=ORG)
    elapsed = time.monotonic() - started
    # The limit is the child's CPU time: a loaded machine stretches it up to BACKSTOP times
    # in wall time (a loop runs at the lowest priority), never further.
    assert elapsed < sandbox.limits().time_limit * sandbox.BACKSTOP + 1.5
    assert info.value.pointer == "/body/x"
    assert "ran longer than" in str(info.value)
    # The evaluator is usable again right away.
    assert await render("{{ .inputs.count }}", DATA, org=ORG) == 3


async def test_a_runaway_template_does_not_fail_other_renders() -> None:
    async def good() -> list[Any]:
        out = []
        for _ in range(20):
            out.append(await render({"n": "{{ .inputs.count }}"}, DATA, org=ORG))
            await asyncio.sleep(0.05)
        return out

    bad = asyncio.create_task(render("{{ def f: f; f }}", DATA, org=ORG))
    results = await good()
    assert results == [{"n": 3}] * 20
    with pytest.raises(TemplateError):
        await bad


async def test_templates_do_not_see_the_service_environment() -> None:
    os.environ["PORTOLAN_TEMPLATE_CANARY"] = "should-not-leak"
    try:
        sandbox.shutdown()  # new children start with the canary in the parent's env
        assert await render("{{ env | length }}", DATA, org=ORG) == 0
        assert await render("{{ $ENV.PORTOLAN_TEMPLATE_CANARY }}", DATA, org=ORG) is None
    finally:
        del os.environ["PORTOLAN_TEMPLATE_CANARY"]


async def test_modules_cannot_be_loaded() -> None:
    with pytest.raises(TemplateError, match="modules are not available"):
        await render('{{ import "/etc/passwd" as $p; $p }}', DATA, org=ORG)


async def test_results_larger_than_the_limit_are_errors() -> None:
    with pytest.raises(TemplateError, match="larger than"):
        await render('{{ [range(200000)] | map("xxxxxxxxxx") }}', DATA, org=ORG)


async def test_data_is_sent_as_json() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    out = await render("{{ .entity.createdAt }}", {"entity": {"createdAt": when}}, org=ORG)
    assert out == "2026-01-02T03:04:05Z"


async def test_one_round_trip_per_render(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = sandbox.evaluate

    async def counting(
        org: object, programs: list[str], documents: list[str], **kw: Any
    ) -> list[list[tuple[bool, Any]]]:
        calls.append(programs)
        return await real(org, programs, documents, **kw)

    monkeypatch.setattr(sandbox, "evaluate", counting)
    value: dict[str, Any] = {f"k{i}": "{{ .inputs.count }} {{ .inputs.name }}" for i in range(50)}
    value["{{ .inputs.key }}"] = ["{{ .run.id }}"] * 10
    out = await render(value, DATA, org=ORG)
    assert out["k49"] == "3 api" and out["region"] == ["r_123"] * 10
    assert len(calls) == 1
    assert sorted(calls[0]) == [".inputs.count", ".inputs.key", ".inputs.name", ".run.id"]
    await render({"plain": 1, "text": "no templates"}, DATA, org=ORG)
    assert len(calls) == 1  # nothing to evaluate, no round trip


def test_referenced_secrets() -> None:
    value = {
        "url": "https://x.test/?t={{ .secrets.API_TOKEN }}",
        "headers": {
            "A": '{{ .secrets["a-b"] }}',
            "B": "{{ .secrets['single'] }}",
            "C": '{{ .secrets."quoted name" }}',
            "D": '{{ .secrets | .["not-found-by-this-scan"] // "" }}',
        },
        "{{ .secrets.KEY_IN_KEY }}": [{"deep": "x {{ .secrets.Deep_1 | ascii_downcase }} y"}],
        "plain": ".secrets.NOT_A_TEMPLATE",
        "escaped": '{{ .secrets["with\\"quote"] }}',
    }
    assert referenced_secrets(value) == {
        "API_TOKEN",
        "a-b",
        "single",
        "quoted name",
        "KEY_IN_KEY",
        "Deep_1",
        'with"quote',
    }
    assert referenced_secrets({"x": "{{ .inputs.secrets }}", "n": 1}) == set()
    assert referenced_secrets({"x": "{{ .inputs.secrets.FOO }}"}) == set()

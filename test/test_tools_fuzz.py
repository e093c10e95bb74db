"""Property-based fuzzing of the tools layer (issue 11): the tools YAML loader and tool
inputs against their schemas. Invariant: no exception but a clear one-line rejection
escapes the loader; any input gets exactly one ToolResult (never an exception)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonic_voice.sonic.tools_seam import ToolUse
from sonic_voice.tools import ToolConfigError, load_tool_config, load_tools

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["action", "service", "topic", "cancel", "read", "knowledge", "mcp", "agent", "bogus"]

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=12)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
tool = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=12) | scalars,
        "description": st.text(max_size=20) | scalars,
        "input": values,
        "timeout_s": values,
        "cancel_on_barge_in": values,
        **{k: values for k in KINDS},
    },
)
documents = st.one_of(values, st.fixed_dictionaries({"tools": st.lists(tool, max_size=3) | values}))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=documents)
def test_tools_yaml_loader_rejects_in_one_line(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tools.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        try:
            load_tool_config(str(path))
        except ToolConfigError as e:
            text = str(e).strip()
            assert text and "\n" not in text, text
            assert "tools.yaml" in text, text  # names the file


_provider: Any = None


def _knowledge() -> Any:
    global _provider
    if _provider is None:
        cfg = Path(tempfile.mkdtemp()) / "tools.yaml"
        docs = ROOT / "config" / "knowledge"
        cfg.write_text(
            "tools:\n  - name: knowledge\n    description: answers from the FAQ\n"
            "    input: {properties: {query: {type: string, minLength: 1}}, required: [query]}\n"
            f"    knowledge: {{documents: {docs}}}\n"
        )
        _provider = load_tools(str(cfg))
    return _provider


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(args=values)
def test_any_tool_input_gets_exactly_one_result(args: Any) -> None:
    provider = _knowledge()
    use = ToolUse(tool_use_id="fuzz", name="knowledge", input=args, raw="")
    result = asyncio.run(provider.run(use, lambda _t, _d: None))
    assert result.tool_use_id == "fuzz"
    valid = isinstance(args, dict) and isinstance(args.get("query"), str) and args["query"]
    if not valid:
        assert result.status == "error" and result.content.get("error"), result

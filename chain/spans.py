"""Spans for the chain's stages and the feature store's read, through the OpenTelemetry API only.

The API is a no-op until a process installs an SDK tracer provider, which Ray Serve does in each replica when the
serve config's `tracing_config` turns tracing on (pipeline/serve/tracing.py names the exporters). A span here is
only ever a child: it starts only when the current span is recording, i.e. inside a request that Serve's ingress
span sampled. An unsampled request, or code outside a request (warm-up, offline evaluation, the tests of chain/),
costs one context lookup per stage (well under a microsecond) and makes no span, so the sampling ratio of the
serve config is the share of whole traces, never of orphan stage spans.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace

_tracer = trace.get_tracer("recserve")


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span named `name` around a block, current inside it (so spans and handle calls made within are its
    children), when the current span records; otherwise a context manager that does nothing."""
    if not trace.get_current_span().is_recording():
        return nullcontext()
    return _tracer.start_as_current_span(name, attributes=attributes)


def trace_id() -> str | None:
    """The current sampled trace's id (32 hex digits, as W3C traceparent writes it), or None outside one."""
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid and ctx.trace_flags.sampled else None

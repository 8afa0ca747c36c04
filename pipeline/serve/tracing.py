"""Traces: the span exporters that the serve config's `tracing_config.exporter_import_path` names.

Ray Serve 2.60 traces requests itself (ray/serve/_private/tracing_utils.py). Each replica reads the serve config's
`tracing_config` from the controller when it starts, installs an OpenTelemetry tracer provider with
`ParentBasedTraceIdRatio(sampling_ratio)`, and adds the span processors that the function at
`exporter_import_path` returns (a function of no arguments returning list[SpanProcessor]). Serve's own spans are
`replica_handle_request <deployment> <method>` around every call into a replica (an HTTP request at the ingress
replica: the trace's root, or the child of a caller's W3C `traceparent`) and `route_to_replica <deployment>
<method>` around each DeploymentHandle call, whose context travels to the called replica in the request's
metadata. The chain's stages and the Redis read add theirs through the OpenTelemetry API (chain/spans.py).

Serve's default exporter writes each span synchronously to a file, on the request's path. These return the SDK's
BatchSpanProcessor instead: a span ends into an in-memory queue (2,048 spans), and a background thread exports
batches (512 spans, every 5 s; OpenTelemetry's OTEL_BSP_* variables change that). A full queue drops spans, never
blocks a request.

- `otlp_exporter`: OTLP over HTTP (protobuf) to a collector, for compose and Kubernetes. The endpoint, headers and
  timeout are OpenTelemetry's own variables: OTEL_EXPORTER_OTLP_ENDPOINT (e.g. http://otel-collector:4318; spans
  go to <endpoint>/v1/traces) or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; OTEL_SERVICE_NAME names the service.
- `file_exporter`: JSON lines, one file per process in RECSERVE_TRACE_DIR (settings.TraceSettings), for the tests
  and the cost measurement (tests/pipeline/serve/test_tracing_e2e.py, loadtests/trace_cost.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from models.errors import ConfigError
from settings import TraceSettings

log = logging.getLogger("recserve")


OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def otlp_exporter() -> list[SpanProcessor]:
    """Spans in batches to the OTLP/HTTP collector that OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT names. With neither set
    (compose without a collector), no processor: requests are still sampled and carry their trace ids in headers
    and logs, but no span leaves the process, instead of every batch failing against localhost:4318."""
    if not any(os.environ.get(name) for name in OTLP_ENDPOINTS):
        log.warning("tracing: no OTEL_EXPORTER_OTLP_ENDPOINT in this process's environment; spans are not exported")
        return []
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return [BatchSpanProcessor(OTLPSpanExporter())]


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One span as a JSON object: ids in hex (trace 32 digits, span 16), times in ns since the epoch."""
    ctx = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
        "span_id": f"{ctx.span_id:016x}" if ctx else None,
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": {k: v if isinstance(v, str | int | float | bool) else list(v) for k, v in span.attributes.items()}
        if span.attributes
        else {},
        "pid": os.getpid(),
    }


class JsonLinesExporter(SpanExporter):
    """Appends each span as one JSON line (`span_record`) to a file; called from the batch processor's thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(json.dumps(span_record(s)) + "\n" for s in spans)
        with self._lock:
            if self._file.closed:
                return SpanExportResult.FAILURE
            self._file.write(text)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def file_exporter() -> list[SpanProcessor]:
    """Spans in batches to <RECSERVE_TRACE_DIR>/spans-<pid>.jsonl. Raises ConfigError when the variable is unset."""
    directory = TraceSettings().dir
    if directory is None:
        raise ConfigError("pipeline.serve.tracing:file_exporter writes to RECSERVE_TRACE_DIR: set it to a folder")
    return [BatchSpanProcessor(JsonLinesExporter(directory / f"spans-{os.getpid()}.jsonl"))]


def read_spans(directory: Path) -> list[dict[str, Any]]:
    """Every span the file exporter wrote under `directory` (each process's file; a torn last line skipped)."""
    out = []
    for path in sorted(directory.glob("spans-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out

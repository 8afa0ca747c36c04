from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pipeline.edge.api import Edge


@pytest.fixture
def edge_over() -> Callable[..., Edge]:
    """Edge(app) as the ingress builds it, with `recorder` and `max_in_flight` of the test's choosing."""

    def make(app: Any, recorder: Any, max_in_flight: int = 8) -> Edge:
        return Edge(
            app,
            max_body_bytes=lambda: 1 << 20,
            recorder=lambda: recorder,
            set_header=True,
            max_in_flight=lambda: max_in_flight,
            body_timeout_s=lambda: 5.0,
        )

    return make

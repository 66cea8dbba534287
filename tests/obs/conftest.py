from __future__ import annotations

import re
from pathlib import Path

from memsvc.obs.metrics import ServiceMetrics
from tests.server.harness import engine, model_dir, service  # noqa: F401  (a real server)

OPS = Path(__file__).resolve().parents[2] / "ops"
METRIC_NAME = re.compile(r"\bmemsvc_[a-z0-9_]+\b")

# What Prometheus exposes per family type (the client's `_created` series are left out:
# nothing should query them).
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported_series() -> dict[str, str]:
    """Every series name the service exports -> the family it belongs to."""
    names = {}
    for family in ServiceMetrics().registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
    return names


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))

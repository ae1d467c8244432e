"""Training platform: job specs, the durable job queue, the sklearn trainer, ONNX export.

``upgrade(url)`` applies the training tables' migrations (``carrara db upgrade`` shape).
"""

from __future__ import annotations

from .queue import Job, JobQueue, upgrade
from .spec import JobSpec, load_spec, parse_spec, validate_spec

__all__ = [
    "Job",
    "JobQueue",
    "JobSpec",
    "load_spec",
    "parse_spec",
    "upgrade",
    "validate_spec",
]

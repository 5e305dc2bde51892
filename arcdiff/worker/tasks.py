"""The function a generation job names (arcdiff.contract.TASK), for workers other than `arcdiff worker`.

`arcdiff worker` never calls it: it reads the job's spec and batches it. A stock RQ worker can
run it (`rq worker -w rq.SimpleWorker -S rq.serializers.JSONSerializer arcdiff:mnist arcdiff:mnist:batch`): one
job at a time, through an engine built once per process from the ARCDIFF_* settings.
"""

from __future__ import annotations

import threading
from typing import Any

from arcdiff.contract import GenerationSpec
from arcdiff.worker.engine import Engine
from arcdiff.worker.settings import WorkerSettings

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _engine_for(model: str) -> Engine:
    from arcdiff.worker.main import build_engine

    with _lock:
        if model not in _engines:
            _engines[model] = build_engine(WorkerSettings(), [model], worker_name="rq-task").start()
        return _engines[model]


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one generation; returns the same JSON result as the batching worker."""
    spec = GenerationSpec.from_payload(payload)
    return _engine_for(spec.model).submit(spec).result().to_payload()

"""The arq worker takes jobs from the real Redis queue and returns their results."""

from __future__ import annotations

import asyncio
import uuid

from arq import create_pool

from app.config import Settings
from app.dispatch.worker import InProcessWorker, redis_settings


async def test_in_process_worker_runs_a_queued_job(settings: Settings) -> None:
    isolated = settings.model_copy(update={"queue_name": f"portolan-test:{uuid.uuid4().hex}"})
    worker = InProcessWorker(isolated)
    pool = await create_pool(redis_settings(isolated), default_queue_name=isolated.queue_name)
    worker.start()
    try:
        value = uuid.uuid4().hex
        job = await pool.enqueue_job("ping", value)
        assert job is not None
        assert await asyncio.wait_for(job.result(timeout=10), 15) == value
    finally:
        await worker.stop()
        await pool.aclose()

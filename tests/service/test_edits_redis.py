"""Editing end to end in Redis mode (issue 22): `arcdiff serve --redis`, a real redis-server and a
real `arcdiff worker`, driven by the sync and async clients. The worker's answers equal the
embedded engine's (model/editing.py's math in the same batch), and a spec that slips past the API
with a bad image fails its own job without harming the worker."""

import asyncio
import base64
import io
import signal
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer
from servicekit import free_port, start_api, start_worker, stop, wait_api_ready, wait_until, wait_workers

from arcdiff.client import AsyncClient, Client, Edit
from arcdiff.contract import TASK, GenerationSpec, queue_name

pytestmark = pytest.mark.timeout(600)

DIGIT = (np.add.outer(np.arange(8), np.arange(8)) * 16).clip(0, 255).astype(np.uint8)
BOTTOM = np.zeros((8, 8), np.uint8)
BOTTOM[4:] = 255


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(redis_server, model_dir, tmp_path_factory):
    redis_server.client.flushall()
    logs = tmp_path_factory.mktemp("edits")
    port = free_port()
    api = start_api(port, model_dir, logs / "api.log", redis_url=redis_server.url, ARCDIFF_WAIT_TIMEOUT_S="60")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    wait_api_ready(api, http, logs / "api.log", 90, path="/healthz", what="the API to listen")
    worker = start_worker(redis_server.url, model_dir, logs / "worker.log", models=("tiny",), max_batch=8)
    wait_workers(redis_server.url, "tiny", 1, [worker])
    wait_until(lambda: http.get("/readyz").status_code == 200, 60, "readyz with a worker", interval=0.2)
    yield {"url": f"http://127.0.0.1:{port}", "http": http, "worker": worker, "redis": redis_server}
    http.close()
    stop(worker, signal.SIGKILL, timeout=10)
    stop(api)
    for f in sorted(logs.iterdir()):
        print(f"--- {f.name} ---\n{f.read_text()[-3000:]}")


def test_every_kind_through_the_clients_in_redis_mode(stack):
    with Client(stack["url"]) as c:
        img2img = c.generate("tiny", 8, "dpmpp2m", seed=4, n=2, edit=Edit(image=png(DIGIT), strength=0.5))
        assert img2img.nfe == 4 and len(img2img.images) == 2
        inpaint = c.generate("tiny", 6, "heun", seed=5, edit=Edit(image=png(DIGIT), mask=png(BOTTOM)))
        assert np.array_equal(np.asarray(inpaint.pil_images[0])[:4], DIGIT[:4])
        enc = c.encode("tiny", png(DIGIT), 6, "heun", roundtrip=True)
        assert enc.latent.shape == (1, 8, 8) and enc.nfe == 12 and enc.roundtrip is not None
        dec = c.generate("tiny", 6, "heun", edit=Edit(noise=enc.latent_base64))
        assert base64.b64encode(dec.images[0].png).decode() == enc.roundtrip["png_base64"]
        frames = c.interpolate("tiny", 1, 2, frames=4, steps=4, solver="ddim")
        ends = [c.generate("tiny", 4, "ddim", seed=s).images[0].png for s in (1, 2)]
        assert [frames.images[0].png, frames.images[3].png] == ends

    async def the_async_client():
        async with AsyncClient(stack["url"]) as ac:
            again = await ac.generate("tiny", 8, "dpmpp2m", seed=4, n=2, edit=Edit(image=png(DIGIT), strength=0.5))
            enc2 = await ac.encode("tiny", png(DIGIT), 6, "heun")
            strip = await ac.interpolate("tiny", png(DIGIT), png(255 - DIGIT), frames=3, steps=4, solver="rk4")
            return again, enc2, strip

    again, enc2, strip = asyncio.run(the_async_client())
    assert [im.png for im in again.images] == [im.png for im in img2img.images]  # a request's images only
    assert enc2.latent_base64 == enc.latent_base64
    assert strip.n == 3 and strip.nfe == 16


def test_a_bad_spec_past_the_api_fails_its_job_and_the_worker_lives(stack):
    """The worker checks inputs again: a job enqueued straight into Redis with a wrong-size image
    fails with the reason, and the next edit runs."""
    bad = GenerationSpec(
        id="b" * 32, model="tiny", steps=3, solver="ddim", seed=0, n=1, submitted_at=time.time(), kind="edit",
        image=base64.b64encode(png(np.zeros((28, 28), np.uint8))).decode(),
    )  # fmt: skip
    q = Queue(queue_name("tiny"), connection=stack["redis"].client, serializer=JSONSerializer)
    q.enqueue_call(TASK, args=(bad.to_payload(),), job_id=bad.id)
    got = wait_until(
        lambda: (b := stack["http"].get(f"/v1/generations/{bad.id}").json())["status"] == "failed" and b, 60, "failure"
    )
    assert "28x28 pixels; model tiny takes 8x8" in got["error"]
    assert stack["worker"].poll() is None
    with Client(stack["url"]) as c:
        assert c.generate("tiny", 4, "ddim", edit=Edit(image=png(DIGIT), strength=0.5)).images

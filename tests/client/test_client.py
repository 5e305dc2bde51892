"""arcdiff.client against a real `arcdiff serve` (embedded mode, tiny models, uvicorn on a free port)
with API keys, a batch of one image and a queue limit of one, so a slow generation can fill the
queue and the client's 429 retries can be watched. Plus the retry rules on a mock transport."""

import asyncio
import email.utils
import itertools
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from servicekit import REPO, free_port, png_pixels, reference, start_api, stop, wait_api_ready, wait_until

from arcdiff.client import (
    APIError,
    AsyncClient,
    Client,
    GenerationFailed,
    GenerationResult,
    GenerationTimeout,
    Unreachable,
    retry_after_seconds,
)

pytestmark = pytest.mark.timeout(180)

KEY = "client-test-key"


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("client")
    port = free_port()
    api = start_api(
        port,
        model_dir,
        logs / "api.log",
        ARCDIFF_API_KEYS=KEY,
        ARCDIFF_MAX_BATCH="1",
        ARCDIFF_QUEUE_LIMIT="1",
        ARCDIFF_TORCH_THREADS="1",
    )
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {KEY}"})

    wait_api_ready(api, http, logs / "api.log")
    yield {"base": base, "http": http, "model_dir": model_dir}
    http.close()
    stop(api)
    print((logs / "api.log").read_text()[-2000:])


def check_images(result: GenerationResult, model_dir, steps, solver, seed, n):
    _, want = reference(model_dir, "tiny", steps, solver, seed, n, amp="auto")
    assert result.seeds == [(seed + k) % 2**32 for k in range(n)]
    for k, im in enumerate(result.images):
        assert im.index == k and im.image.size == (8, 8) and im.image.mode == "L"
        got = np.array(im.image).astype(int)
        assert np.abs(got - want[k].astype(int)).max() <= 1


def test_generate(service):
    with Client(service["base"], api_key=KEY) as client:
        assert [m["name"] for m in client.models()] == ["tiny", "tiny-eps"]
        result = client.generate("tiny", steps=3, solver="ddim", seed=7, n=3, timeout=60, priority="batch")
    assert (result.model, result.steps, result.solver, result.seed, result.n, result.nfe, result.priority) == (
        "tiny",
        3,
        "ddim",
        7,
        3,
        3,
        "batch",
    )
    check_images(result, service["model_dir"], 3, "ddim", 7, 3)
    assert len(result.pil_images) == 3 and result.retries == 0
    m = result.metrics
    for key in ("queue_ms", "sample_ms", "encode_ms", "total_ms"):
        assert 0 <= m[key] <= m["total_ms"] + 1e-6
    assert m["device"] == "cpu" and m["batch_sizes"] == [1]
    # the image the API serves raw is the one the client decoded
    raw = service["http"].get(f"/v1/generations/{result.id}/images/2.png").content
    assert raw == result.images[2].png and (png_pixels(raw) == np.array(result.images[2].image)).all()


def test_errors_carry_the_api_message(service):
    http = service["http"]
    with Client(service["base"], api_key=KEY) as client:
        with pytest.raises(APIError) as e:
            client.generate("tiny", steps=5000, solver="rk5", n=99)
        want = http.post("/v1/generations", json={"model": "tiny", "steps": 5000, "solver": "rk5", "n": 99}).json()
        assert e.value.status_code == 422 and e.value.message == want["message"]
        assert e.value.message.startswith("steps: Input should be less than or equal to 1000; solver: ")
        assert set(e.value.fields) == {"steps", "solver", "n"} and "422: steps:" in str(e.value)

        with pytest.raises(APIError) as e:
            client.generate("nope", steps=2, solver="euler")
        assert e.value.status_code == 422 and e.value.message.startswith("model: ")

        with pytest.raises(APIError) as e:
            client.get("0" * 32)
        assert e.value.status_code == 404 and "0" * 32 in e.value.message

    for key in (None, "wrong"):
        with Client(service["base"], api_key=key) as client, pytest.raises(APIError) as e:
            client.generate("tiny", steps=2, solver="euler")
        raw = httpx.post(
            service["base"] + "/v1/generations",
            json={"model": "tiny", "steps": 2, "solver": "euler"},
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )
        assert e.value.status_code == raw.status_code in (401, 403) and e.value.message == raw.json()["detail"]

    with Client(f"http://127.0.0.1:{free_port()}", api_key=KEY) as client, pytest.raises(Unreachable):
        client.models()


def test_retry_on_429_honours_retry_after(service):
    """Batch of one, queue of one: a long generation runs, a second waits, so the queue is full."""
    http = service["http"]
    long = http.post("/v1/generations", json={"model": "tiny", "steps": 300, "solver": "ddim", "seed": 1}).json()
    wait_until(
        lambda: http.get(long["url"]).json()["status"] == "running", 30, "the long generation to start", interval=0.01
    )
    queued = http.post("/v1/generations", json={"model": "tiny", "steps": 1, "solver": "euler", "seed": 2})
    assert queued.status_code == 202
    full = http.post("/v1/generations", json={"model": "tiny", "steps": 1, "solver": "euler"})
    assert full.status_code == 429, "the queue should be full while the long generation runs"
    assert http.get(long["url"]).json()["status"] == "running"

    # no retries allowed: the 429 itself, with the API's message and Retry-After
    with Client(service["base"], api_key=KEY, max_retries=0) as client, pytest.raises(APIError) as e:
        client.generate("tiny", steps=2, solver="heun", seed=11, n=2)
    assert e.value.status_code == 429 and e.value.message == full.json()["detail"]
    assert e.value.retry_after == float(full.headers["retry-after"]) >= 1

    # retries: waits Retry-After between tries until the queue has room, then gets its images
    t0 = time.monotonic()
    with Client(service["base"], api_key=KEY, max_retries=60) as client:
        result = client.generate("tiny", steps=2, solver="heun", seed=11, n=2, timeout=120)
    elapsed = time.monotonic() - t0
    assert result.retries >= 1 and elapsed >= result.retries * float(full.headers["retry-after"]) * 0.9
    check_images(result, service["model_dir"], 2, "heun", 11, 2)
    assert http.get(long["url"]).json()["status"] == "finished"


def test_503_is_retried_then_surfaced(model_dir, tmp_path):
    """A service whose model cannot load stays 503 (Retry-After 2): the client retries as often as
    allowed, each wait capped by max_retry_wait, then raises the API's reason."""
    broken = tmp_path / "models" / "broken"
    shutil.copytree(model_dir / "tiny", broken)
    shutil.copy(model_dir / "tiny-eps" / "model.safetensors", broken / "model.safetensors")  # wrong shapes
    port = free_port()
    api = start_api(port, broken.parent, tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:

        def failed_loading():
            if api.poll() is not None:
                raise RuntimeError((tmp_path / "api.log").read_text()[-3000:])
            try:
                reason = httpx.get(base + "/readyz").json().get("reason") or ""
                return reason not in ("", "loading models")  # done loading, and failed
            except httpx.TransportError:
                return False

        wait_until(failed_loading, 90, "the model load to fail", interval=0.1)
        t0 = time.monotonic()
        with Client(base, max_retries=2, max_retry_wait=0.2) as client, pytest.raises(APIError) as e:
            client.generate("broken", steps=2, solver="euler")
        assert 0.4 <= time.monotonic() - t0 < 5
        assert e.value.status_code == 503 and e.value.retry_after == 2.0
        assert e.value.message == httpx.get(base + "/readyz").json()["reason"]  # the API's own reason
        metrics = httpx.get(base + "/metrics").text
        assert 'arcdiff_generations_rejected_total{reason="not_ready"} 3.0' in metrics  # 1 try + 2 retries
    finally:
        stop(api)


def test_timeout_names_the_generation(service):
    """Batch of one: a 300-step generation runs (>= 0.3 s on any CPU), a 1-step one waits behind it."""
    with Client(service["base"], api_key=KEY, poll_interval=0.01) as client:
        t0 = time.monotonic()
        with pytest.raises(GenerationTimeout) as e:
            client.generate("tiny", steps=300, solver="euler", seed=3, timeout=0.05, wait=False)
        assert time.monotonic() - t0 < 1 and e.value.status in ("queued", "running")
        first = e.value.id
        with pytest.raises(GenerationTimeout) as e:  # wait=true: no id yet when the deadline passes
            client.generate("tiny", steps=1, solver="euler", seed=4, timeout=0.05)
        assert e.value.id is None and "no answer" in str(e.value)
        # the generation goes on without the client: poll it by id
        wait_until(lambda: client.get(first)["status"] == "finished", 60, "the timed-out generation", interval=0.05)


def test_async_twin(service):
    async def main():
        async with AsyncClient(service["base"], api_key=KEY, max_retries=60) as client:
            assert [m["name"] for m in await client.models()] == ["tiny", "tiny-eps"]
            # three at once against a queue of one: the ones turned away retry
            results = await asyncio.gather(
                *(
                    client.generate(
                        "tiny", steps=3, solver="ddim", seed=s, n=1, timeout=120, wait=s != 8
                    )  # one of them polls from the start
                    for s in (7, 8, 9)
                )
            )
            with pytest.raises(APIError) as e:
                await client.generate("tiny", steps=0, solver="euler")
            return results, e.value

    results, err = asyncio.run(main())
    assert [r.seed for r in results] == [7, 8, 9]
    for r in results:
        check_images(r, service["model_dir"], 3, "ddim", r.seed, 1)
    assert err.status_code == 422 and err.message == "steps: Input should be greater than or equal to 1"


def test_generate_command_with_url(service, model_dir, tmp_path, monkeypatch, capsys):
    from arcdiff.cli import main

    monkeypatch.setenv("ARCDIFF_API_KEY", KEY)  # the --api-key default
    remote, local = tmp_path / "remote.png", tmp_path / "local.png"
    args = ["generate", "--model", "tiny", "--steps", "3", "--solver", "ddim", "--seed", "7", "-n", "5", "--nrow", "3"]
    assert main([*args, "--url", service["base"], "--priority", "batch", "-o", str(remote)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "5 images of tiny" in out and "seeds 7..11" in out and "total" in out
    assert "15/15 [" in captured.err and "NFE" in captured.err  # the progress bar, from the event stream
    assert main([*args, "--model-dir", str(model_dir), "--device", "cpu", "-o", str(local)]) == 0
    got, want = png_pixels(remote.read_bytes()).astype(int), png_pixels(local.read_bytes()).astype(int)
    assert got.shape == want.shape == (2 * 10 + 2, 3 * 10 + 2) and np.abs(got - want).max() <= 1

    bad = [
        "generate",
        "--url",
        service["base"],
        "--model",
        "tiny",
        "--steps",
        "5000",
        "--solver",
        "rk4",
        "-o",
        str(tmp_path / "x.png"),
    ]
    assert main(bad) == 1
    assert "steps: Input should be less than or equal to 1000" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---- retry rules, on a mock transport ------------------------------------------------------------

FINISHED = {
    "id": "a" * 32,
    "status": "finished",
    "url": "/v1/generations/" + "a" * 32,
    "model": "m",
    "steps": 1,
    "solver": "euler",
    "seed": 3,
    "n": 0,
    "nfe": 1,
    "images": [],
    "metrics": {"total_ms": 1.0},
}


def scripted(answers, seen):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((time.monotonic(), request))
        code, headers, body = answers.pop(0)
        return httpx.Response(code, headers=headers, json=body)

    return httpx.MockTransport(handler)


def test_retry_after_is_honoured_and_bounded():
    seen = []
    answers = [
        (503, {"Retry-After": "0.2"}, {"detail": "loading models"}),
        (429, {"Retry-After": "3600"}, {"detail": "queue full"}),  # capped by max_retry_wait
        (202, {}, {**FINISHED, "status": "queued", "images": []}),
        (200, {}, {**FINISHED, "status": "running"}),
        (200, {}, FINISHED),
    ]
    with Client(
        "http://svc", api_key="k", transport=scripted(answers, seen), max_retry_wait=0.3, poll_interval=0.01
    ) as client:
        result = client.generate("m", 1, "euler", timeout=10)
    assert result.retries == 2 and result.id == "a" * 32 and not answers
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
    assert 0.2 <= gaps[0] < 0.29 and 0.3 <= gaps[1] < 0.39
    assert all(r.headers["authorization"] == "Bearer k" for _, r in seen)
    posts = [r for _, r in seen if r.method == "POST"]
    assert len(posts) == 3 and all(b'"wait":true' in r.content.replace(b" ", b"") for r in posts)

    # out of retries, or a wait that would pass the deadline: the API's error, not a hang
    answers = [(503, {"Retry-After": "0"}, {"detail": "no worker serves m"})] * 3
    with Client("http://svc", transport=scripted(answers, []), max_retries=2) as client, pytest.raises(APIError) as e:
        client.generate("m", 1, "euler")
    assert e.value.status_code == 503 and e.value.message == "no worker serves m" and not answers
    answers = [(429, {"Retry-After": "20"}, {"detail": "queue full"})]
    t0 = time.monotonic()
    with Client("http://svc", transport=scripted(answers, [])) as client, pytest.raises(APIError) as e:
        client.generate("m", 1, "euler", timeout=5)
    assert e.value.status_code == 429 and time.monotonic() - t0 < 1

    # other errors are not retried; a failed generation raises GenerationFailed with its reason
    answers = [(500, {}, {"detail": "boom"})]
    with Client("http://svc", transport=scripted(answers, [])) as client, pytest.raises(APIError) as e:
        client.generate("m", 1, "euler")
    assert e.value.status_code == 500 and e.value.message == "boom"
    answers = [(202, {}, {**FINISHED, "status": "queued"}), (200, {}, {**FINISHED, "status": "failed", "error": "NaN"})]
    with (
        Client("http://svc", transport=scripted(answers, []), poll_interval=0.01) as client,
        pytest.raises(GenerationFailed, match="NaN"),
    ):
        client.generate("m", 1, "euler")


def test_retry_after_forms():
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds(None) == 1.0 and retry_after_seconds("soon") == 1.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(later) <= 31
    assert retry_after_seconds("-5") == 0.0


def test_client_module_stays_light():
    code = (
        "import sys, arcdiff.client; print(sorted(m for m in ('torch', 'numpy', 'PIL', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr

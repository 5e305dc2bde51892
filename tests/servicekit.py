"""Helpers for the service and worker tests: real redis-server, real worker and API processes,
tiny models made on the spot, and reference images computed with model.solvers.sample."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def make_models(folder: Path) -> Path:
    """Two tiny (8x8x1) models with random weights: 'tiny' (dual head) and 'tiny-eps'."""
    from arcdiff.model.configs import get_config
    from arcdiff.model.format import make_config, save_model
    from arcdiff.model.unet import UNet

    for name, prediction, seed in (("tiny", "x0_eps", 0), ("tiny-eps", "eps", 1)):
        torch.manual_seed(seed)
        cfg = get_config("tiny", heads=2 if prediction == "x0_eps" else 1)
        save_model(folder / name, UNet(cfg), make_config(name, cfg, prediction, {"steps": 0}))
    return folder


class RedisServer:
    """A throwaway redis-server on a free loopback port (never the machine's 6379)."""

    def __init__(self, workdir: Path):
        if not Path(REDIS_SERVER).exists():
            raise RuntimeError("these tests need a real redis-server on PATH (apt-get install redis-server)")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        self.client = redis.Redis(port=self.port)
        wait_until(self._up, 10, "redis-server")

    def _up(self) -> bool:
        import redis

        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(10)


class RestartableRedis:
    """A redis-server on a fixed free port that can be killed and started again on that port (and
    data folder). `persistent`: append-only file with appendfsync always, so every write a client
    saw acknowledged survives a SIGKILL (the deployments use everysec: up to a second lost)."""

    def __init__(self, workdir: Path, persistent: bool = False):
        import redis

        self.port, self.workdir, self.persistent = free_port(), workdir, persistent
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis(port=self.port)
        self.start()

    def start(self) -> None:
        import redis

        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                return bool(self.client.ping())
            except redis.ConnectionError:
                return False
            except redis.ResponseError:  # -LOADING: still reading the append-only file
                return False

        wait_until(up, 20, "redis-server")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def child_env(model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCDIFF_")}
    env.update(
        {
            "ARCDIFF_MODEL_DIR": str(model_dir),
            "ARCDIFF_TORCH_THREADS": "1",
            "ARCDIFF_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def start_worker(
    redis_url: str,
    model_dir: Path,
    log: Path,
    models: tuple[str, ...] = ("tiny",),
    max_batch: int = 8,
    metrics_port: int = 0,
    **env: str,
) -> subprocess.Popen:
    """An `arcdiff worker` process; `metrics_port` 0: no metrics port (see worker_gauge)."""
    cmd = [
        sys.executable,
        "-m",
        "arcdiff.cli",
        "worker",
        "--redis",
        redis_url,
        "--max-batch",
        str(max_batch),
        "--metrics-port",
        str(metrics_port),
        "--device",
        "cpu",
    ]
    for m in models:
        cmd += ["--model", m]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(model_dir, **env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def worker_gauge(port: int, name: str, **labels: str) -> float | None:
    """One sample from a worker's metrics port (None: not listening yet, or no such sample)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def workers_on(redis_url: str, model: str) -> int:
    import redis
    from rq import Queue, Worker

    conn = redis.Redis.from_url(redis_url)
    try:
        return len(Worker.all(queue=Queue(f"arcdiff:{model}", connection=conn)))
    finally:
        conn.close()


def wait_workers(redis_url: str, model: str, count: int, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    def ready() -> bool:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"worker exited early with {p.returncode}")
        return workers_on(redis_url, model) >= count

    wait_until(ready, timeout, f"{count} worker(s) on {model}", interval=0.2)


def start_api(port: int, model_dir: Path, log: Path, redis_url: str | None = None, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "arcdiff.cli", "serve", "--port", str(port), "--host", "127.0.0.1"]
    if redis_url:
        cmd += ["--redis", redis_url]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(model_dir, **env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


class Api:
    """One `arcdiff serve` process; `client` talks to it over real HTTP."""

    def __init__(self, model_dir, log, redis_url=None, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = start_api(self.port, model_dir, log, redis_url=redis_url, **env)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_listening(self, timeout=120):
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"API exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return self.client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout, "the API to listen", interval=0.2)
        return self

    def wait_ready(self, timeout=120, headers=None):
        self.wait_listening(timeout)
        wait_until(lambda: self.client.get("/readyz").status_code == 200, timeout, "the API to be ready", interval=0.2)
        return self

    def close(self):
        self.client.close()
        stop(self.proc, signal.SIGTERM, timeout=20)
        print(f"--- {self.log.name} ---\n{self.log.read_text()[-3000:]}")


def wait_api_ready(
    api: subprocess.Popen,
    http: httpx.Client,
    log: Path,
    timeout: float = 90,
    path: str = "/readyz",
    what: str = "the API to be ready",
) -> None:
    """Wait for `path` (/readyz; /healthz: merely listening) to answer 200, failing at once with
    the log's tail if the API exits."""

    def ready() -> bool:
        if api.poll() is not None:
            raise RuntimeError(f"API exited with {api.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return http.get(path).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout, what, interval=0.2)


def poll_generation(client: Any, gen_id: str, timeout: float, interval: float) -> dict:
    """GET the generation until it is finished or failed; returns its body."""

    def done() -> dict | None:
        body = client.get(f"/v1/generations/{gen_id}").json()
        return body if body["status"] in ("finished", "failed") else None

    return wait_until(done, timeout, f"generation {gen_id}", interval=interval)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def headless_chromium(profile: Path, log: Path, extra_args: tuple[str, ...] = (), performance_log: bool = False) -> Any:
    """Debian's chromium + chromedriver through selenium (skips the test when they are missing).
    Never downloads a driver or a browser. `performance_log`: keep the DevTools network events
    (driver.get_log("performance"))."""
    import pytest

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(
            f"no headless browser: {', '.join(missing)} missing "
            "(apt-get install --no-install-recommends chromium chromium-driver)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never download a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={profile}",
        "--window-size=1280,860",
        *extra_args,
    ):
        opts.add_argument(arg)
    if performance_log:
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(log)), options=opts)
    driver.set_page_load_timeout(30)
    return driver


def png_pixels(data: bytes | str) -> np.ndarray:
    """PNG bytes (or base64) -> uint8 array; asserts nothing, returns (H, W) or (H, W, C)."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        return np.array(im)


def png_info(data: bytes | str) -> tuple[str, tuple[int, int]]:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as im:
        return im.format + ":" + im.mode, im.size


_loaded: dict[tuple[str, str, str], Any] = {}


def reference(
    model_dir: Path,
    model: str,
    steps: int,
    solver: str,
    seed: int,
    n: int,
    schedule: str = "uniform",
    amp: str = "none",
) -> tuple[torch.Tensor, np.ndarray]:
    """What image k of a request must be: model.solvers.sample with per-image generators.

    `amp` is the network's autocast: "none" for an engine built on a float32 model, "auto" for
    what a worker or embedded API started with default settings runs on this CPU (bf16 where it
    is native). Returns the float samples (n, C, H, W) and the uint8 pixels (n, H, W) of
    one-channel models."""
    from arcdiff.model.images import to_uint8
    from arcdiff.model.registry import ModelRegistry
    from arcdiff.model.rng import image_generator, image_seed, initial_noise
    from arcdiff.model.solvers import sample
    from arcdiff.worker.loading import AMP_DTYPES, resolve_speed

    amp = resolve_speed(torch.device("cpu"), amp).amp
    key = (str(model_dir), model, amp)
    if key not in _loaded:
        _loaded[key] = ModelRegistry(model_dir).load(model, amp_dtype=AMP_DTYPES[amp])
    loaded = _loaded[key]
    gens = [image_generator(image_seed(seed, k)) for k in range(n)]
    x_T = torch.stack([initial_noise(loaded.image_shape, g) for g in gens])
    with one_thread(), torch.inference_mode():
        x = sample(loaded.denoiser, x_T, steps, solver, generator=gens, schedule=schedule)
    return x, to_uint8(x).numpy()[:, 0]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models are all overhead: intra-op threads only fight over a busy 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def assert_images_match(
    images: list[dict], model_dir: Path, model: str, steps: int, solver: str, seed: int, schedule: str = "uniform"
) -> None:
    """API images (base64) equal the reference at the served precision, up to one grey level
    (float rounding at .5)."""
    _, want = reference(model_dir, model, steps, solver, seed, len(images), schedule, amp="auto")
    for k, im in enumerate(images):
        assert im["index"] == k and im["seed"] == (seed + k) % 2**32
        got = png_pixels(im["png_base64"]).astype(int)
        diff = np.abs(got - want[k].astype(int)).max()
        assert diff <= 1, f"{solver} image {k}: differs from the reference by {diff} grey levels"


def webhook_secret(fill: bytes = b"k") -> str:
    """A Standard Webhooks secret ('whsec_' + base64 of 32 bytes)."""
    return "whsec_" + base64.b64encode(fill * 32).decode()


class WebhookReceiver:
    """A real HTTP server on loopback, in a thread, that checks each POST's Standard Webhooks
    signature with the `standardwebhooks` library's own Webhook class: verified deliveries are kept
    in `deliveries` (answered `status`, 204), others in `rejected` (answered 401). It can be
    started late, or stopped and started again on the same port (a receiver that is down)."""

    def __init__(self, secret: str, port: int | None = None, status: int = 204):
        import threading

        self.secret, self.port, self.status = secret, port or free_port(), status
        self.deliveries: list[dict] = []
        self.rejected: list[dict] = []
        self.changed = threading.Condition()
        self.server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from standardwebhooks import Webhook, WebhookVerificationError

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                record = {"headers": headers, "body": body, "path": self.path}
                try:
                    record["payload"] = Webhook(receiver.secret).verify(body, headers)
                    code = receiver.status
                except WebhookVerificationError as e:
                    record["reason"] = str(e)
                    code = 401
                with receiver.changed:
                    (receiver.deliveries if code != 401 else receiver.rejected).append(record)
                    receiver.changed.notify_all()
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def wait_for(self, check: Callable[[WebhookReceiver], Any], timeout: float, what: str) -> Any:
        """Block until check(self) is true (evaluated whenever a POST arrives)."""
        with self.changed:
            if not self.changed.wait_for(lambda: check(self), timeout):
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        return check(self)

    def events(self, gen_id: str) -> list[str]:
        """The verified deliveries' types for one generation, in arrival order."""
        return [d["payload"]["type"] for d in self.deliveries if d["payload"]["data"]["id"] == gen_id]

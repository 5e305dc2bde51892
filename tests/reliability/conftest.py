"""Fixtures of the reliability tests: real `arcdiff serve` processes (uvicorn) on free ports."""

import signal

import httpx
import pytest
from servicekit import free_port, start_api, stop, wait_until


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


@pytest.fixture
def start_api_process(model_dir, tmp_path):
    apis = []

    def start(**env):
        api = Api(model_dir, tmp_path / f"api{len(apis)}.log", **env)
        apis.append(api)
        return api

    yield start
    for api in apis:
        api.close()

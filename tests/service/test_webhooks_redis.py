"""Webhooks in Redis mode, with real processes: a redis-server, a worker, and API processes under
uvicorn that deliver to a real receiver on loopback. The delivery state is in Redis: an API stopped
while its receiver is down loses nothing (another one delivers, after the attempts the first one
recorded), and two replicas never deliver one event twice."""

import signal

import pytest
from servicekit import Api, WebhookReceiver, start_worker, stop, wait_until, wait_workers, webhook_secret

pytestmark = pytest.mark.timeout(300)

SECRET = webhook_secret(b"r")
BODY = {"model": "tiny", "steps": 2, "solver": "ddim", "seed": 4, "wait": True}
ENV = {
    "ARCDIFF_MODELS": "tiny",
    "ARCDIFF_WEBHOOK_SECRET": SECRET,
    "ARCDIFF_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
    "ARCDIFF_WEBHOOK_POLL_S": "0.05",
    "ARCDIFF_WEBHOOK_BACKOFF_S": "0.05",
    "ARCDIFF_WEBHOOK_BACKOFF_MAX_S": "0.3",
    "ARCDIFF_WEBHOOK_ATTEMPTS": "20",
}


def deliveries(api, gen_id):
    return api.client.get(f"/v1/generations/{gen_id}").json()["webhook"]["deliveries"]


def settled(api, gen_id, count):
    def check():
        ds = deliveries(api, gen_id)
        return ds if len(ds) == count and all(d["state"] != "pending" for d in ds) else None

    return wait_until(check, 60, f"{count} settled deliveries of {gen_id}", interval=0.05)


def test_deliveries_survive_an_api_restart_and_replicas_deliver_once(redis_server, model_dir, tmp_path):
    redis_server.client.flushall()
    worker = start_worker(redis_server.url, model_dir, tmp_path / "worker.log", models=("tiny",), max_batch=4)
    apis = []
    receiver = WebhookReceiver(SECRET)  # down: nothing listens on its port yet
    try:
        wait_workers(redis_server.url, "tiny", 1, [worker])
        first = Api(model_dir, tmp_path / "api0.log", redis_url=redis_server.url, **ENV).wait_ready()
        apis.append(first)
        hook = {"url": receiver.url, "events": ["queued", "finished"]}
        r = first.client.post("/v1/generations", json={**BODY, "webhook": hook})
        assert r.status_code == 200 and r.json()["status"] == "finished", r.text
        gen_id = r.json()["id"]

        def both_failed_twice():
            ds = deliveries(first, gen_id)
            return len(ds) == 2 and all(len(d["attempts"]) >= 2 for d in ds)

        wait_until(both_failed_twice, 60, "failed attempts of both events", interval=0.05)
        first.close()  # SIGTERM: its dispatcher stops; what it held is in Redis

        replicas = [Api(model_dir, tmp_path / f"api{i}.log", redis_url=redis_server.url, **ENV) for i in (1, 2)]
        apis += replicas
        for api in replicas:
            api.wait_ready()
        receiver.start()
        got = settled(replicas[0], gen_id, 2)
        assert sorted(receiver.events(gen_id)) == ["generation.finished", "generation.queued"]
        for d in got:
            assert d["state"] == "delivered", d
            *failed, last = d["attempts"]
            assert len(failed) >= 2 and all(a["error"].startswith("ConnectError") for a in failed), d
            assert last["status_code"] == 204
        assert settled(replicas[1], gen_id, 2) == got  # both replicas read one state

        # more generations, through either replica: each event delivered once
        ids = [
            replicas[i % 2].client.post("/v1/generations", json={**BODY, "webhook": hook}).json()["id"]
            for i in range(4)
        ]
        for gen in ids:
            for d in settled(replicas[0], gen, 2):
                assert d["state"] == "delivered" and len(d["attempts"]) == 1, d
            assert sorted(receiver.events(gen)) == ["generation.finished", "generation.queued"]
        assert not receiver.rejected
    finally:
        receiver.stop()
        for api in apis:
            if api.proc.poll() is None:
                api.close()
        stop(worker, signal.SIGTERM, timeout=30)

"""Redis with append-only persistence killed with SIGKILL and started again on the same data
folder and port while generations are queued, running and finished-but-unread: nothing is lost.
The API and the worker keep running through it and reconnect on their own.

The server runs with appendfsync always (every acknowledged write is on disk before the reply),
so what the test shows does not depend on when the kill lands; the shipped deployments use
everysec, which may lose the last second of writes (docs/deployment.md)."""

import signal

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer
from servicekit import RestartableRedis, assert_images_match, start_worker, stop, wait_until, wait_workers

pytestmark = pytest.mark.timeout(400)


def status_in_redis(conn, gen_id):
    """The job's RQ status read straight from Redis: the client side of the API never reads it."""
    return Job.fetch(gen_id, connection=conn, serializer=JSONSerializer).get_status()


def test_sigkill_and_restart_loses_no_generation_and_no_result(model_dir, tmp_path):
    from servicekit import Api

    server = RestartableRedis(tmp_path, persistent=True)
    api = Api(model_dir, tmp_path / "api.log", redis_url=server.url, ARCDIFF_READY_CACHE_S="0.5")
    worker = start_worker(
        server.url,
        model_dir,
        tmp_path / "worker.log",
        max_batch=4,
        ARCDIFF_HEARTBEAT_S="1",
        ARCDIFF_WORKER_TTL_S="10",
        ARCDIFF_MAINTENANCE_S="2",
    )
    conn = server.client
    try:
        api.wait_ready()
        wait_workers(server.url, "tiny", 1, [worker])

        def post(**body):
            r = api.client.post("/v1/generations", json={"model": "tiny", **body})
            assert r.status_code == 202, r.text
            return r.json()["id"], body

        # finished and never read by a client
        done = [post(steps=3, solver="heun", seed=10 + i, n=2) for i in range(2)]
        for gen_id, _ in done:
            wait_until(lambda g=gen_id: status_in_redis(conn, g) == "finished", 60, "short ones to finish")
        # running: 4 images fill the worker's batch of 4 for thousands of evaluations
        running = post(steps=400, solver="rk4", seed=20, n=4)
        wait_until(lambda: status_in_redis(conn, running[0]) == "started", 60, "the long one to run")
        # queued behind it
        queued = [post(steps=2, solver=s, seed=30 + i) for i, s in enumerate(("ddim", "ddpm"))]
        assert [status_in_redis(conn, g) for g, _ in queued] == ["queued", "queued"]
        assert status_in_redis(conn, running[0]) == "started"

        server.kill()
        r = api.client.get(f"/v1/generations/{done[0][0]}")
        assert r.status_code == 503 and "Redis" in r.json()["message"], r.text  # a clear answer meanwhile
        server.start()  # same port, same data folder: the append-only file is replayed

        assert status_in_redis(conn, queued[0][0]) in ("queued", "started", "finished"), "a queued one was lost"
        gens = {}
        for gen_id, _ in [*done, running, *queued]:
            gens[gen_id] = wait_until(
                lambda g=gen_id: (
                    (r := api.client.get(f"/v1/generations/{g}")).status_code == 200
                    and r.json()["status"] in ("finished", "failed")
                    and r.json()
                ),
                240,
                f"generation {gen_id} to end",
                interval=0.2,
            )
        for gen_id, body in [*done, running, *queued]:
            gen = gens[gen_id]
            # the running one may have ended while Redis was away; then its started entry expires and
            # RQ runs it again (ARCDIFF_RETRIES) or fails it saying so: never lost, never silent
            assert gen["status"] == "finished" or (gen["status"] == "failed" and gen["error"]), gen
            if gen["status"] == "finished":
                assert_images_match(gen["images"], model_dir, "tiny", body["steps"], body["solver"], body["seed"])
                for im in gen["images"]:
                    assert api.client.get(im["url"]).status_code == 200
        assert [gens[g]["status"] for g, _ in [*done, *queued]] == ["finished"] * 4
        assert worker.poll() is None and api.proc.poll() is None, "the worker or the API died with Redis"
        # and new work is served without restarting either
        r = api.client.post("/v1/generations", json={"model": "tiny", "steps": 2, "solver": "euler", "wait": True})
        assert r.status_code == 200 and r.json()["status"] == "finished", r.text
    finally:
        stop(worker, signal.SIGTERM, timeout=30)
        api.close()
        print("--- worker.log ---\n" + (tmp_path / "worker.log").read_text()[-4000:])
        conn.close()
        server.kill()

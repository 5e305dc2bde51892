"""Generations owned by API keys, and idempotent submits, against real `arcdiff serve` processes in
both modes: embedded (one API), and Redis (a real redis-server, one worker, two API processes, so a
request may go to either replica)."""

import hashlib
import signal
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from servicekit import free_port, start_api, start_worker, stop, wait_api_ready, wait_workers

pytestmark = pytest.mark.timeout(300)

A, B = "tenant-a-key", "tenant-b-key"
BODY = {"model": "tiny", "steps": 2, "solver": "ddim", "seed": 11}
LONG = {"model": "tiny", "steps": 1000, "solver": "rk4", "seed": 5, "n": 2}  # 8000 evaluations: still running


def auth(key):
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module", params=["redis", "embedded"])
def stack(request, redis_server, model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp(f"keys-{request.param}")
    env = {"ARCDIFF_API_KEYS": f"{A},{B}", "ARCDIFF_MAX_BATCH": "4", "ARCDIFF_MODELS": "tiny"}
    procs, urls = [], []
    if request.param == "redis":
        redis_server.client.flushall()
        procs.append(start_worker(redis_server.url, model_dir, logs / "worker.log", models=("tiny",), max_batch=4))
        wait_workers(redis_server.url, "tiny", 1, procs)
    for i in range(2 if request.param == "redis" else 1):
        port = free_port()
        redis_url = redis_server.url if request.param == "redis" else None
        procs.append(start_api(port, model_dir, logs / f"api{i}.log", redis_url=redis_url, **env))
        urls.append(f"http://127.0.0.1:{port}")
        with httpx.Client(base_url=urls[-1], timeout=60) as h:
            wait_api_ready(procs[-1], h, logs / f"api{i}.log")
    clients = [httpx.Client(base_url=u, timeout=120) for u in urls]
    yield {"mode": request.param, "clients": clients, "http": clients[0], "redis": redis_server}
    for c in clients:
        c.close()
    for p in procs:
        stop(p, signal.SIGTERM, timeout=30)
    for f in sorted(logs.iterdir()):
        print(f"--- {f.name} ---\n{f.read_text()[-3000:]}")


def unknown(r, gen_id):
    """What an unknown id answers: 404 with the same message, so another key learns nothing."""
    return r.status_code == 404 and r.json()["message"] == f"no generation {gen_id} (unknown or expired)"


def _inflated(value: bytes) -> bytes:
    """RQ keeps a job's call (its spec) zlib-compressed: read it as stored and inflated."""
    try:
        return value + zlib.decompress(value)
    except zlib.error:
        return value


def redis_values(client) -> bytes:
    """Every key and value in Redis, concatenated (strings, hashes, lists, sets, sorted sets, streams)."""
    out = []
    for key in client.scan_iter(count=1000):
        out.append(key)
        kind = client.type(key).decode()
        if kind == "string":
            out.append(client.get(key) or b"")
        elif kind == "hash":
            out += [k + _inflated(v) for k, v in client.hgetall(key).items()]
        elif kind == "list":
            out += client.lrange(key, 0, -1)
        elif kind == "set":
            out += list(client.smembers(key))
        elif kind == "zset":
            out += client.zrange(key, 0, -1)
        elif kind == "stream":
            out += [b"".join(k + v for k, v in fields.items()) for _id, fields in client.xrange(key)]
    return b"\n".join(out)


def test_a_generation_belongs_to_the_key_that_made_it(stack):
    http = stack["http"]
    r = http.post("/v1/generations", json={**BODY, "wait": True}, headers=auth(A))
    assert r.status_code == 200 and r.json()["status"] == "finished", r.text
    gen_id, url = r.json()["id"], r.json()["url"]
    for h in stack["clients"]:  # Redis mode: on either replica
        for method, path in (("GET", url), ("GET", f"{url}/events"), ("GET", f"{url}/images/0.png"), ("DELETE", url)):
            assert unknown(h.request(method, path, headers=auth(B)), gen_id), (method, path)
        assert h.get(url, headers=auth(A)).json()["status"] == "finished"
        assert h.get(f"{url}/images/0.png", headers=auth(A)).headers["content-type"] == "image/png"
        with h.stream("GET", f"{url}/events", headers=auth(A)) as s:
            assert s.status_code == 200 and "event: finished" in s.read().decode()
        assert h.delete(url, headers=auth(A)).status_code == 409  # A's own: already finished

    # a running generation: B cannot cancel it, A can
    long = http.post("/v1/generations", json=LONG, headers=auth(A)).json()
    assert unknown(http.delete(long["url"], headers=auth(B)), long["id"])
    assert http.get(long["url"], headers=auth(A)).json()["status"] in ("queued", "running")
    assert http.delete(long["url"], headers=auth(A)).json()["status"] == "canceled"

    # metrics stay aggregate: either key reads the same series, none names a key or its hash
    fingerprint = "key:" + hashlib.sha256(A.encode()).hexdigest()[:16]
    metrics = [http.get("/metrics", headers=auth(k)).text for k in (A, B)]
    for text in metrics:
        assert 'arcdiff_generation_requests_total{model="tiny",solver="ddim",status="finished"}' in text
        assert A not in text and B not in text and fingerprint not in text
    if stack["mode"] == "redis":
        stored = redis_values(stack["redis"].client)
        assert fingerprint.encode() in stored  # the owner is kept, as a short hash of the key
        assert A.encode() not in stored and B.encode() not in stored  # never the key itself


def count_jobs(stack) -> int:
    """Generations made so far: RQ jobs in Redis mode, accepted 202s of the one API when embedded."""
    if stack["mode"] == "redis":
        return sum(1 for _ in stack["redis"].client.scan_iter("rq:job:*", count=1000))
    text = stack["http"].get("/metrics", headers=auth(A)).text
    line = 'arcdiff_generation_requests_total{model="tiny",solver="rk4",status="queued"} '
    return int(float(next((ln[len(line) :] for ln in text.splitlines() if ln.startswith(line)), "0")))


def test_concurrent_repeats_of_an_idempotent_submit_make_one_generation(stack):
    key = f"order-{uuid.uuid4().hex}"
    before = count_jobs(stack)
    clients = stack["clients"]

    def post(i):
        return clients[i % len(clients)].post("/v1/generations", json=LONG, headers={**auth(A), "Idempotency-Key": key})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert all(r.status_code == 202 for r in answers), [(r.status_code, r.text[:200]) for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1, ids
    [gen_id] = ids
    assert sorted(r.headers.get("idempotent-replayed", "") for r in answers) == [""] + ["true"] * 7
    assert count_jobs(stack) == before + 1

    # the same key with another body is refused, naming the header
    r = clients[-1].post("/v1/generations", json={**LONG, "seed": 6}, headers={**auth(A), "Idempotency-Key": key})
    assert r.status_code == 422, r.text
    assert r.json()["message"] == (
        "Idempotency-Key: this key was already used with a different request body; use a new key for a new request"
    )
    assert r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    # keys are per API key: B's identical request is B's own generation
    rb = clients[0].post("/v1/generations", json=LONG, headers={**auth(B), "Idempotency-Key": key})
    assert rb.status_code == 202 and rb.json()["id"] != gen_id and "idempotent-replayed" not in rb.headers
    assert count_jobs(stack) == before + 2
    for h, k in ((auth(A), gen_id), (auth(B), rb.json()["id"])):
        assert clients[0].delete(f"/v1/generations/{k}", headers=h).json()["status"] == "canceled"

    # after it ended, a repeat answers it as it is now (200), waiting or not
    for wait in (False, True):
        r = clients[0].post("/v1/generations", json={**LONG, "wait": wait}, headers={**auth(A), "Idempotency-Key": key})
        if wait:  # another body: wait is part of it
            assert r.status_code == 422
            continue
        assert r.status_code == 200 and r.json()["id"] == gen_id and r.json()["status"] == "canceled", r.text
        assert r.headers["idempotent-replayed"] == "true"
    assert count_jobs(stack) == before + 2

    if stack["mode"] == "redis":  # kept by a hash of (API key, Idempotency-Key), with the TTL
        names = list(stack["redis"].client.scan_iter("arcdiff:idem:*"))
        assert len(names) == 2 and all(key.encode() not in n for n in names)
        assert all(0 < stack["redis"].client.ttl(n) <= 86400 for n in names)


def test_a_waiting_repeat_gets_the_finished_generation(stack):
    key = f"wait-{uuid.uuid4().hex}"
    headers = {**auth(A), "Idempotency-Key": key}
    first = stack["http"].post("/v1/generations", json={**BODY, "wait": True}, headers=headers)
    again = stack["clients"][-1].post("/v1/generations", json={**BODY, "wait": True}, headers=headers)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert again.json()["images"] == first.json()["images"]


@pytest.mark.parametrize(
    "value",
    ["x" * 256, "has space", "tab\tkey", "é"],
)
def test_bad_idempotency_keys_are_422(stack, value):
    r = stack["http"].post("/v1/generations", json=BODY, headers={**auth(A), "Idempotency-Key": value.encode()})
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("Idempotency-Key: "), r.json()["message"]


def test_without_keys_nothing_changes(model_dir, tmp_path):
    """No ARCDIFF_API_KEYS: any caller reads and cancels any generation, as before."""
    port = free_port()
    api = start_api(port, model_dir, tmp_path / "api.log", ARCDIFF_MODELS="tiny", ARCDIFF_MAX_BATCH="4")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as h:
            wait_api_ready(api, h, tmp_path / "api.log")
            gen = h.post("/v1/generations", json={**BODY, "wait": True})
            assert gen.status_code == 200, gen.text
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as other:
                assert other.get(gen.json()["url"]).json()["status"] == "finished"
                long = other.post("/v1/generations", json=LONG).json()
                assert h.delete(long["url"]).json()["status"] == "canceled"
    finally:
        stop(api, signal.SIGTERM, timeout=30)

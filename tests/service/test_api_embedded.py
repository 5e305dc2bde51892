"""The HTTP API in embedded mode (engine in-process), driven through FastAPI's in-process client."""

import pytest
from fastapi.testclient import TestClient
from servicekit import assert_images_match, one_thread, png_info, png_pixels, poll_generation, wait_until

from arcdiff.model.solver_names import (
    DEFAULT_SCHEDULE,
    DEFAULT_SOLVER,
    DEFAULT_STEPS,
    FEW_STEPS_MAX,
    FEW_STEPS_SOLVER,
    SOLVER_TABLE,
    resolve,
)
from arcdiff.model.solvers import SOLVERS
from arcdiff.service.app import create_app
from arcdiff.service.settings import Settings

BASE = {"model": "tiny", "steps": 3, "solver": "ddim", "seed": 7, "n": 1}


def make_client(model_dir, **kw):
    kw = {"model_dir": model_dir, "torch_threads": 1, "max_batch": 8, "redis_url": None, **kw}
    return TestClient(create_app(Settings(**kw)))


def wait_ready(client):
    wait_until(lambda: client.get("/readyz").status_code == 200, 60, "models to load")


@pytest.fixture(scope="module")
def client(model_dir):
    with one_thread(), make_client(model_dir) as c:
        wait_ready(c)
        yield c


def poll(client, gen_id, timeout=120):
    return poll_generation(client, gen_id, timeout, interval=0.02)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"surprise": 1}, "surprise"),
        ({"steps": 0}, "steps"),
        ({"steps": 1001}, "steps"),
        ({"steps": "10"}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": None}, "steps"),
        ({"solver": "rk5"}, "solver"),
        ({"solver": 4}, "solver"),
        ({"solver": None}, "solver"),
        ({"schedule": "cosine"}, "schedule"),
        ({"schedule": 1}, "schedule"),
        ({"schedule": None}, "schedule"),
        ({"model": "nope"}, "model"),
        ({"model": "../tiny"}, "model"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": "2"}, "n"),
        ({"wait": "yes"}, "wait"),
        ({"wait": 1}, "wait"),
        ({"priority": "urgent"}, "priority"),
        ({"priority": None}, "priority"),
        ({"priority": 1}, "priority"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, change, field):
    r = client.post("/v1/generations", json={**BASE, **change})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["message"].startswith(f"{field}: "), body["message"]
    assert any(e["loc"][-1] == field for e in body["detail"])


def test_model_is_required(client):
    r = client.post("/v1/generations", json={k: v for k, v in BASE.items() if k != "model"})
    assert r.status_code == 422 and r.json()["message"] == "model: Field required"


@pytest.mark.parametrize(
    "given, want",
    [
        ({}, (DEFAULT_SOLVER, DEFAULT_STEPS, DEFAULT_SCHEDULE)),
        ({"solver": "rk4"}, ("rk4", 2, "uniform")),  # about the default's 10 NFE; rk4 keeps its grid
        ({"solver": "dpmpp2m", "steps": 4}, ("dpmpp2m", 4, "uniform")),  # the names that had one grid keep it
        ({"solver": "unipc2", "steps": 3}, ("unipc2", 3, DEFAULT_SCHEDULE)),
        ({"steps": 3, "schedule": "logsnr"}, (FEW_STEPS_SOLVER, 3, "logsnr")),  # few steps: a deterministic one
        ({"steps": FEW_STEPS_MAX + 1}, (DEFAULT_SOLVER, FEW_STEPS_MAX + 1, DEFAULT_SCHEDULE)),
    ],
)
def test_solver_steps_and_schedule_default(client, model_dir, given, want):
    body = {"model": "tiny", "seed": 3, "n": 2, "wait": True, **given}
    gen = client.post("/v1/generations", json=body).json()
    assert gen["status"] == "finished", gen
    assert (gen["solver"], gen["steps"], gen["schedule"]) == want
    assert gen["nfe"] == want[1] * {"rk4": 4}.get(want[0], 1)
    assert_images_match(gen["images"], model_dir, "tiny", want[1], want[0], 3, want[2])


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'"tiny"', b"null"])
def test_malformed_bodies_are_422_not_500(client, raw):
    r = client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text


def test_ids_and_images_that_do_not_exist(client):
    assert client.get("/v1/generations/" + "0" * 32).status_code == 404
    assert client.get("/v1/generations/..%2F..%2Fetc").status_code == 404
    assert client.get("/v1/generations/not-an-id/images/0.png").status_code == 404
    gen = client.post("/v1/generations", json={**BASE, "wait": True}).json()
    assert client.get(f"{gen['url']}/images/1.png").status_code == 404
    assert client.get(f"{gen['url']}/images/x.png").status_code == 422


def test_status_life_cycle(client):
    """queued (behind a full batch) -> running -> finished, each seen through GET."""
    blocker = client.post("/v1/generations", json={**BASE, "n": 8, "steps": 12, "solver": "euler"}).json()
    gen = client.post("/v1/generations", json={**BASE, "steps": 40, "solver": "rk4"}).json()
    assert gen["status"] == "queued" and gen["images"] == [] and gen["metrics"] is None
    seen = []

    def record():
        s = client.get(gen["url"]).json()["status"]
        if not seen or seen[-1] != s:
            seen.append(s)
        return s in ("finished", "failed")

    wait_until(record, 120, "the generation to finish", interval=0.005)
    assert seen == ["queued", "running", "finished"], seen
    assert poll(client, blocker["id"])["status"] == "finished"


def test_images_decode_and_seeds(client, model_dir):
    body = {**BASE, "n": 3, "seed": 2**32 - 2, "steps": 4, "wait": True}
    r = client.post("/v1/generations", json=body)
    assert r.status_code == 200 and r.headers["location"] == r.json()["url"]
    gen = r.json()
    assert gen["status"] == "finished" and gen["nfe"] == 4 and gen["metrics"]["nfe"] == 4
    assert [im["seed"] for im in gen["images"]] == [2**32 - 2, 2**32 - 1, 0]  # wraps mod 2^32
    for im in gen["images"]:
        assert png_info(im["png_base64"]) == ("PNG:L", (8, 8))
        raw = client.get(im["url"])
        assert raw.headers["content-type"] == "image/png"
        assert (png_pixels(raw.content) == png_pixels(im["png_base64"])).all()
    assert_images_match(gen["images"], model_dir, "tiny", 4, "ddim", 2**32 - 2)
    px = [png_pixels(im["png_base64"]) for im in gen["images"]]
    assert (px[0] != px[1]).any() and (px[1] != px[2]).any()  # different index, different image
    again = client.post("/v1/generations", json=body).json()
    assert [im["png_base64"] for im in again["images"]] == [im["png_base64"] for im in gen["images"]]
    third = client.post("/v1/generations", json={**body, "seed": 0, "n": 1}).json()
    assert third["images"][0]["png_base64"] == gen["images"][2]["png_base64"]


def test_server_chooses_a_seed_when_none_is_given(client):
    a = client.post("/v1/generations", json={k: v for k, v in BASE.items() if k != "seed"}).json()
    b = client.post("/v1/generations", json={k: v for k, v in BASE.items() if k != "seed"}).json()
    assert 0 <= a["seed"] < 2**32 and a["seed"] != b["seed"]


def test_accept_png_returns_the_image_with_server_timing(client, model_dir):
    r = client.post("/v1/generations", json={**BASE, "wait": True}, headers={"accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert set(timing) == {"queue", "sample", "encode", "total"} and float(timing["total"]) > 0
    assert_images_match(
        [{"index": 0, "seed": 7, "png_base64": __import__("base64").b64encode(r.content).decode()}],
        model_dir,
        "tiny",
        3,
        "ddim",
        7,
    )
    r = client.post("/v1/generations", json={**BASE, "n": 2, "wait": True}, headers={"accept": "image/png"})
    assert r.status_code == 406
    r = client.post("/v1/generations", json={**BASE, "n": 2}, headers={"accept": "image/png, application/json;q=0.5"})
    assert r.status_code == 202 and r.headers["content-type"] == "application/json"


def test_mixed_requests_at_once_all_correct_and_sharing_batches(client, model_dir):
    bodies = [
        {"model": "tiny", "steps": 2 + i, "solver": s, "seed": 10 * i, "n": 1 + i % 2} for i, s in enumerate(SOLVERS)
    ]
    bodies.append({"model": "tiny-eps", "steps": 3, "solver": "dpmpp2m", "seed": 5, "n": 2})
    ids = [client.post("/v1/generations", json=b).json()["id"] for b in bodies]
    gens = [poll(client, i) for i in ids]
    for body, gen in zip(bodies, gens, strict=True):
        assert gen["status"] == "finished", gen
        assert len(gen["images"]) == body["n"]
        assert_images_match(
            gen["images"], model_dir, body["model"], body["steps"], body["solver"], body["seed"], gen["schedule"]
        )
    shared = [g for g in gens if g["model"] == "tiny" and max(g["metrics"]["batch_sizes"]) > g["n"]]
    assert len(shared) >= 2, [g["metrics"]["batch_sizes"] for g in gens]


def test_priority_is_optional_and_shown(client, model_dir):
    """A batch generation runs like any other (same images), and says so in its body."""
    gen = client.post("/v1/generations", json={**BASE, "n": 2, "priority": "batch", "wait": True}).json()
    assert gen["status"] == "finished" and gen["priority"] == "batch", gen
    assert client.get(gen["url"]).json()["priority"] == "batch"
    assert_images_match(gen["images"], model_dir, "tiny", BASE["steps"], BASE["solver"], BASE["seed"], gen["schedule"])
    assert client.post("/v1/generations", json=BASE).json()["priority"] == "interactive"


def test_short_request_finishes_while_a_long_one_runs(client):
    long = client.post("/v1/generations", json={**BASE, "steps": 60, "solver": "rk4"}).json()
    wait_until(
        lambda: client.get(long["url"]).json()["status"] == "running", 60, "the long one to start", interval=0.01
    )
    short = client.post("/v1/generations", json={**BASE, "steps": 1, "wait": True}).json()
    assert short["status"] == "finished"
    assert client.get(long["url"]).json()["status"] == "running", "the short request waited for the long one"
    assert max(short["metrics"]["batch_sizes"]) >= 2
    assert poll(client, long["id"])["status"] == "finished"


def test_models_health_ready_metrics_openapi(client):
    gen = client.post("/v1/generations", json={**BASE, "wait": True}).json()
    assert gen["status"] == "finished" and client.get(gen["url"]).status_code == 200
    models = {m["name"]: m for m in client.get("/v1/models").json()}
    assert set(models) == {"tiny", "tiny-eps"}
    assert models["tiny"] == {
        "name": "tiny",
        "image_size": 8,
        "channels": 1,
        "prediction": "x0_eps",
        "parameters": models["tiny"]["parameters"],
        "solvers": list(SOLVERS),
        "workers": 1,  # the in-process engine
        "schedules": ["uniform", "logsnr", "karras"],
        "nfe_per_step": {s: {"heun": 2, "rk4": 4}.get(s, 1) for s in SOLVERS},
        "defaults": {"solver": DEFAULT_SOLVER, "steps": DEFAULT_STEPS, "schedule": DEFAULT_SCHEDULE},
        "few_steps_default": {"solver": FEW_STEPS_SOLVER, "max_steps": FEW_STEPS_MAX},
        # additions: each solver's own grid (from the solver table), and null for a model not distilled
        "default_schedules": {s.name: s.default_grid for s in SOLVER_TABLE},
        "distilled": None,
    }
    assert models["tiny-eps"]["prediction"] == "eps" and models["tiny"]["parameters"] > 40_000
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {
        "status": "ready",
        "mode": "embedded",
        "reason": None,
        "workers": {"tiny": 1, "tiny-eps": 1},
    }
    text = client.get("/metrics").text
    for name in (
        "arcdiff_http_requests_total",
        "arcdiff_http_request_duration_seconds_bucket",
        "arcdiff_generation_requests_total",
        "arcdiff_queue_depth",
        "arcdiff_worker_images_total",
        "arcdiff_worker_nfe_total",
        "arcdiff_worker_jobs_total",
        "arcdiff_worker_batch_size_bucket",
        "arcdiff_worker_queue_wait_seconds_bucket",
        "arcdiff_worker_sample_seconds_bucket",
        "arcdiff_worker_encode_seconds_bucket",
        "arcdiff_worker_running_images",
        "arcdiff_worker_waiting_images",
        "arcdiff_worker_paused_images",
        "arcdiff_worker_load_seconds",
        "arcdiff_worker_compile_seconds",
        "arcdiff_worker_device_memory_bytes",
    ):
        assert f"\n{name}{{" in text, name
    for name in ("arcdiff_worker_up 1.0", "arcdiff_worker_busy 0.0"):
        assert f"\n{name}\n" in text, name
    assert 'route="/v1/generations/{gen_id}"' in text  # route templates, never raw ids
    spec = client.get("/openapi.json").json()
    assert {
        "/v1/generations",
        "/v1/generations/{gen_id}",
        "/v1/generations/{gen_id}/images/{k}.png",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    req = spec["components"]["schemas"]["GenerationRequest"]
    assert req["additionalProperties"] is False
    assert req["properties"]["n"]["maximum"] == 16 and req["properties"]["steps"]["maximum"] == 1000
    assert req["properties"]["model"]["enum"] == ["tiny", "tiny-eps"]
    assert {"200", "202", "406", "422", "429", "503"} <= set(spec["paths"]["/v1/generations"]["post"]["responses"])


def test_queue_full_is_429_with_retry_after(model_dir):
    with one_thread(), make_client(model_dir, max_batch=1, queue_limit=1) as c:
        wait_ready(c)
        running = c.post("/v1/generations", json={**BASE, "steps": 200, "solver": "rk4"}).json()
        wait_until(lambda: c.get(running["url"]).json()["status"] == "running", 60, "the first to run")
        assert c.post("/v1/generations", json=BASE).status_code == 202
        r = c.post("/v1/generations", json=BASE)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert 'arcdiff_generations_rejected_total{reason="queue_full"}' in c.get("/metrics").text


def test_api_keys(model_dir):
    with one_thread(), make_client(model_dir, api_keys="k1,k2") as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"authorization": "Bearer nope"}).status_code == 403
        assert c.get("/v1/models", headers={"authorization": "Bearer k2"}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": "k1"}).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_no_models_is_not_ready(tmp_path):
    with make_client(tmp_path) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "no models to serve"
        r = c.post("/v1/generations", json=BASE)
        assert r.status_code == 422 and "no models are served" in r.json()["message"]


def test_a_distilled_model_gets_its_own_defaults(model_dir, tmp_path):
    """A student's config.json names the solver, steps and grid it was distilled for: /v1/models
    shows them and a request that leaves them out gets them (model.catalog.ModelInfo.resolve), as
    `arcdiff generate` does locally; naming another solver gives that solver's usual defaults."""
    import json
    import shutil

    models = tmp_path / "models"
    shutil.copytree(model_dir / "tiny", models / "tiny-2step")
    cfg_path = models / "tiny-2step" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    quality = {"sets": 5, "set_size": 1000, "fd": {"judge": {"student": 10.43, "teacher_best_at_10": 4.82}}}
    cfg["distilled"] = {"teacher": "tiny", "steps": 2, "solver": "ddim", "schedule": "logsnr", "quality": quality}
    cfg_path.write_text(json.dumps(cfg))
    with one_thread(), make_client(models) as c:
        (info,) = c.get("/v1/models").json()
        assert info["distilled"] == cfg["distilled"]
        assert info["defaults"] == {"solver": "ddim", "steps": 2, "schedule": "logsnr"}
        assert info["default_schedules"]["ddim"] == "logsnr" and info["default_schedules"]["rk4"] == "uniform"
        wait_ready(c)
        gen = c.post("/v1/generations", json={"model": "tiny-2step", "seed": 1, "wait": True}).json()
        assert (gen["solver"], gen["steps"], gen["schedule"], gen["nfe"]) == ("ddim", 2, "logsnr", 2)
        other = c.post("/v1/generations", json={"model": "tiny-2step", "solver": "rk4", "wait": True}).json()
        assert (other["solver"], other["steps"], other["schedule"]) == resolve("rk4", None, None)

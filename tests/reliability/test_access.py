"""Access control against a real `arcdiff serve` (embedded engine): hashed API keys, 401/403,
the per-key images-per-minute limit, CORS off unless configured, and request data that looks
like a path never reaching the file system."""

import hashlib

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.timeout(300)

PLAIN, SECRET = "plain-key-1", "s3cret-key-2"
HASHED = "sha256:" + hashlib.sha256(SECRET.encode()).hexdigest()
LIMIT = 6
BODY = {"model": "tiny", "steps": 2, "solver": "ddim", "seed": 1}


def bearer(key):
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def api(model_dir, tmp_path_factory):
    from conftest import Api

    a = Api(
        model_dir,
        tmp_path_factory.mktemp("access") / "api.log",
        ARCDIFF_API_KEYS=f"{PLAIN},{HASHED}",
        ARCDIFF_RATE_LIMIT_IMAGES_PER_MIN=str(LIMIT),
        ARCDIFF_MAX_BATCH="8",
    )
    a.wait_ready()
    yield a
    a.close()


def test_hashed_and_plain_keys_401_without_403_wrong(api):
    c = api.client
    gen_url = "/v1/generations/" + "a" * 32
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/generations"),
        ("GET", gen_url),
        ("GET", gen_url + "/images/0.png"),
        ("GET", "/metrics"),
    ):
        kw = {"json": BODY} if method == "POST" else {}
        r = c.request(method, path, **kw)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        assert c.request(method, path, headers=bearer("wrong"), **kw).status_code == 403, path
        # the configured digest itself is not a key
        assert c.request(method, path, headers=bearer(HASHED), **kw).status_code == 403, path
        assert c.request(method, path, headers=bearer(HASHED[7:]), **kw).status_code == 403, path
    assert c.get("/v1/models", headers=bearer(SECRET)).status_code == 200
    assert c.get("/v1/models", headers=bearer(PLAIN)).status_code == 200
    assert c.get("/v1/models", headers={"x-api-key": SECRET}).status_code == 200
    assert c.get("/metrics", headers=bearer(SECRET)).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    r = c.post("/v1/generations", json={**BODY, "wait": True}, headers=bearer(SECRET))
    assert r.status_code == 200 and r.json()["status"] == "finished"
    assert c.get(r.json()["images"][0]["url"]).status_code == 401
    assert c.get(r.json()["images"][0]["url"], headers=bearer(PLAIN)).status_code == 200
    assert SECRET not in api.log.read_text()


def test_per_key_images_per_minute(api):
    """Each key has its own budget of LIMIT images per minute; past it, 429 with Retry-After.
    (A minute boundary mid-test would reset the window: retried once then.)"""
    for attempt in range(2):
        c = api.client
        key = f"{PLAIN}" if attempt == 0 else SECRET
        codes = [c.post("/v1/generations", json={**BODY, "n": 2}, headers=bearer(key)).status_code for _ in range(3)]
        r = c.post("/v1/generations", json={**BODY, "n": 1}, headers=bearer(key))
        if codes == [202, 202, 202] and r.status_code == 429:
            break
    else:
        pytest.fail(f"limit not applied: {codes} then {r.status_code}")
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "images per minute" in r.json()["detail"]
    assert 'arcdiff_generations_rejected_total{reason="rate_limited"}' in c.get("/metrics", headers=bearer(key)).text
    other = PLAIN if key == SECRET else SECRET
    assert c.post("/v1/generations", json=BODY, headers=bearer(other)).status_code == 202, "limits are per key"


@pytest.mark.parametrize(
    "model",
    ["../tiny", "..%2Ftiny", "/etc/passwd", "tiny/../tiny", "tiny\x00", "~/.ssh/id_rsa", "C:\\windows", ".", ""],
)
def test_model_names_that_look_like_paths_are_422(api, model):
    r = api.client.post("/v1/generations", json={**BODY, "model": model}, headers=bearer(PLAIN))
    assert r.status_code == 422 and r.json()["message"].startswith("model: "), r.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/generations/..%2F..%2Fetc%2Fpasswd",
        "/v1/generations/%2Fetc%2Fpasswd",
        "/v1/generations/a/b",
        "/v1/generations/" + "a" * 31 + "%2F",
        "/v1/generations/" + "a" * 32 + "/images/..%2F..%2Fx.png",
        "/v1/generations/" + "A" * 32,
        "/v1/generations/..",
        "/v1/generations/" + "a" * 32 + "/images/0.png%00",
        "/static/..%2F..%2Fsettings.py",
        "/static/..%2Fapi%2Fdeps.py",
        "/static/%2Fetc%2Fpasswd",
    ],
)
def test_ids_that_look_like_paths_are_404(api, path):
    r = api.client.get(path, headers=bearer(PLAIN), follow_redirects=True)  # a trailing slash redirects first
    assert r.status_code in (404, 422), (r.status_code, r.text)


def test_no_request_path_reaches_the_file_system(model_dir, tmp_path):
    """The only file-system reads are the model folder at startup: count opens while serving."""
    import builtins
    import os

    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    with TestClient(create_app(Settings(model_dir=model_dir, redis_url=None, max_batch=4))) as c:
        from servicekit import wait_until

        wait_until(lambda: c.get("/readyz").status_code == 200, 60, "models")
        opened = []
        real_open, real_os_open = builtins.open, os.open
        builtins.open = lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1]
        os.open = lambda f, *a, **k: (opened.append(str(f)), real_os_open(f, *a, **k))[1]
        try:
            for model in ("../tiny", str(model_dir / "tiny")):
                assert c.post("/v1/generations", json={**BODY, "model": model}).status_code == 422
            for gid in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "a" * 32):
                assert c.get(f"/v1/generations/{gid}").status_code == 404
            assert c.post("/v1/generations", json={**BODY, "wait": True}).status_code == 200
        finally:
            builtins.open, os.open = real_open, real_os_open
        assert not [f for f in opened if "passwd" in f or str(model_dir) in f or ".." in f], opened


def test_cors_is_off_unless_configured(api, model_dir):
    preflight = {
        "origin": "https://evil.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    r = api.client.options("/v1/generations", headers=preflight)
    assert "access-control-allow-origin" not in r.headers and r.status_code in (401, 405)
    r = api.client.get("/v1/models", headers={**bearer(PLAIN), "origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    app = create_app(Settings(model_dir=model_dir, redis_url=None, cors_origins="https://ok.example"))
    with TestClient(app) as c:
        r = c.options("/v1/generations", headers={**preflight, "origin": "https://ok.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.options("/v1/generations", headers=preflight)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = c.get("/healthz", headers={"origin": "https://ok.example"})
        assert r.headers["access-control-allow-origin"] == "https://ok.example"


def test_bad_hashed_key_setting_is_refused():
    from pydantic import ValidationError

    from arcdiff.service.settings import Settings

    with pytest.raises(ValidationError, match="sha256"):
        Settings(api_keys="sha256:1234")

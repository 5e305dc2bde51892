"""Access control against a real `arcdiff serve` (embedded engine): hashed API keys, 401/403,
the per-key images-per-minute limit, CORS off unless configured, and request data that looks
like a path never reaching the file system."""

import contextlib
import hashlib
import os
import sys

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
    from servicekit import Api

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
    assert c.get(r.json()["images"][0]["url"], headers=bearer(SECRET)).status_code == 200
    # a generation belongs to the key that made it: another key gets what an unknown id gets
    assert c.get(r.json()["images"][0]["url"], headers=bearer(PLAIN)).status_code == 404
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


# Audit events (PEP 578) that name a path: every open through Python (builtins.open, io.open,
# os.open, pathlib, and C extensions that call Python's open) raises "open"; listing a folder
# (os.listdir, os.scandir, hence Path.iterdir, os.walk, glob) raises its own.
FS_EVENTS = {
    "open",
    "os.listdir",
    "os.scandir",
    "glob.glob",
    "glob.glob/2",
    "os.chdir",
    "os.mkdir",
    "os.remove",
    "os.rename",
    "os.rmdir",
    "os.truncate",
    "shutil.copyfile",
    "shutil.rmtree",
}
_fs_events: list[tuple[str, str]] | None = None  # recording while not None


def _audit(event, args):
    if _fs_events is not None and event in FS_EVENTS and args and args[0] is not None:
        path = args[0]
        path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else f"fd {path}"
        _fs_events.append((event, path))


_audit_hook_added = False


def _open_fds() -> dict[str, str]:
    """fd -> what it points at, for this process."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed between listdir and readlink
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return fds


def test_no_request_path_reaches_the_file_system(model_dir, tmp_path):
    """The only file-system reads are the model folder at startup: nothing a request does touches
    the disk there, nor any path the request names.

    Three checks, because no single one sees everything. (1) Audit hooks see every Python-level
    open and folder listing in this process, from any thread: the registry's config.json reads
    (Path.read_text) and folder scans (Path.iterdir), code that calls open/os.open, and native
    extensions that call Python's open. They do not see opens made natively (safetensors' Rust
    reader behind safe_open) nor os.stat/Path.is_file (no audit event). (2) The requests run a
    second time with the model folder moved away: a request that reads model files in any way,
    natively included, then fails. (3) The process's open fds (/proc/self/fd) before and after:
    a file left open by a request. A native read of a path other than the model folder, opened
    and closed within a request, is seen by none of these."""
    global _fs_events, _audit_hook_added
    import shutil

    from arcdiff.service.app import create_app
    from arcdiff.service.settings import Settings

    if not _audit_hook_added:  # an audit hook cannot be removed: add one, for the whole session
        sys.addaudithook(_audit)
        _audit_hook_added = True
    models = shutil.copytree(model_dir, tmp_path / "models")

    def touches_disk_it_should_not(path: str) -> bool:
        return "passwd" in path or str(model_dir) in path or str(models) in path or ".." in path

    def requests(c):
        for model in ("../tiny", str(models / "tiny"), str(model_dir / "tiny")):
            r = c.post("/v1/generations", json={**BODY, "model": model})
            assert r.status_code == 422, r.text
        for gid in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", "a" * 32):
            assert c.get(f"/v1/generations/{gid}").status_code == 404
        r = c.get("/v1/models")
        assert r.status_code == 200, r.text
        r = c.post("/v1/generations", json={**BODY, "wait": True})
        assert r.status_code == 200, r.text

    with TestClient(create_app(Settings(model_dir=models, redis_url=None, max_batch=4))) as c:
        from servicekit import wait_until

        wait_until(lambda: c.get("/readyz").status_code == 200, 60, "models")
        fds_before = _open_fds()
        _fs_events = []
        try:
            requests(c)
        finally:
            events, _fs_events = _fs_events, None
        bad_events = [e for e in events if touches_disk_it_should_not(e[1])]
        assert not bad_events, bad_events

        away = models.rename(tmp_path / "moved-away")
        try:
            requests(c)
        finally:
            away.rename(models)
        fds_after = _open_fds()
    opened = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    leaked = [f for f in opened.values() if touches_disk_it_should_not(f)]
    assert not leaked, leaked


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

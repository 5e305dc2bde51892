"""Bad input against a real `arcdiff serve` (embedded engine, tiny models): schemathesis fuzzing of
the app's own OpenAPI schema, and malformed HTTP that a schema-driven fuzzer does not produce.
Zero server errors allowed."""

import socket

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.timeout(300)

EXAMPLES = 25  # per operation and generation mode: bounded, the whole fuzz stays well under a minute


@pytest.fixture(scope="module")
def api(model_dir, tmp_path_factory):
    from servicekit import Api

    # short waits and job timeouts: fuzzed wait=true requests for 1000 steps must not pile up
    a = Api(
        model_dir,
        tmp_path_factory.mktemp("fuzz") / "api.log",
        ARCDIFF_WAIT_TIMEOUT_S="0.3",
        ARCDIFF_JOB_TIMEOUT_S="1",
        ARCDIFF_MAX_IMAGES="4",
        ARCDIFF_QUEUE_LIMIT="8",
        ARCDIFF_MAX_BATCH="8",
        ARCDIFF_MAX_BODY_BYTES="4096",
    )
    a.wait_ready()
    yield a
    a.close()


def test_schemathesis_finds_no_server_error(api):
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/generations", "GET /v1/generations/{gen_id}", "GET /v1/models", "GET /readyz"} <= labels
    seen: dict[int, int] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                response = case.call(base_url=api.url, timeout=30)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (
                    # run at once below, inside the loop that binds op and mode
                    f"{op.label} ({mode.value}) -> {response.status_code}: {response.text[:500]}\n"  # noqa: B023
                    f"{case.as_curl_command()}"
                )

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (GET /healthz has no parameters)
                assert mode is GenerationMode.NEGATIVE, op.label
    print("status codes seen:", dict(sorted(seen.items())))
    assert sum(seen.values()) >= 40
    assert any(200 <= c < 300 for c in seen) and 422 in seen, seen


def raw_http(api, data: bytes, timeout=10) -> tuple[int, bytes]:
    """Send raw bytes, return (status, whole response) — for what httpx will not send."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"content-length" in b"".join(chunks).lower():
                    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ]
                    if length and len(body) >= length[0]:
                        break
        except (TimeoutError, ConnectionResetError):
            pass
    raw = b"".join(chunks)
    return int(raw.split(b" ", 2)[1]), raw


BODY = b'{"model": "tiny", "steps": 2, "solver": "ddim"}'


@pytest.mark.parametrize(
    "method, path, headers, body, want",
    [
        ("POST", "/v1/generations", {"content-type": "application/json"}, b"{" * 5000, 413),
        (
            "POST",
            "/v1/generations",
            {"content-type": "application/json"},
            b'{"model": "tiny", "steps": 2, "solver": "ddim", "pad": "' + b"x" * 10_000 + b'"}',
            413,
        ),
        ("POST", "/v1/generations", {"content-type": "text/plain"}, BODY, 415),
        ("POST", "/v1/generations", {"content-type": "application/x-www-form-urlencoded"}, b"model=tiny&steps=2", 415),
        ("POST", "/v1/generations", {"content-type": "multipart/form-data; boundary=x"}, b"--x--", 415),
        ("POST", "/v1/generations", {"content-type": "application/json"}, b"\xff\xfe\x00garbage", 422),
        ("POST", "/v1/generations", {"content-type": "application/json"}, b"not json at all", 422),
        (
            "POST",
            "/v1/generations",
            {"content-type": "application/json"},
            b'{"model": "tiny", "steps": 1e999, "solver": "ddim"}',
            422,
        ),
        (
            "POST",
            "/v1/generations",
            {"content-type": "application/json"},
            b'{"model": "tiny", "steps": 99999999999999999999999999, "solver": "ddim"}',
            422,
        ),
        (
            "POST",
            "/v1/generations",
            {"content-type": "application/json"},
            b'{"model": "tiny", "steps": 2, "solver": "ddim", "n": -5}',
            422,
        ),
        ("POST", "/v1/generations", {"content-type": "application/json"}, b"[" * 3000 + b"]" * 3000, 413),
        ("POST", "/v1/generations", {"content-type": "application/json"}, b"[" * 1000 + b"]" * 1000, 400),
        ("PUT", "/v1/generations", {"content-type": "application/json"}, BODY, 405),
        ("DELETE", "/v1/generations/" + "a" * 32, {}, b"", 404),  # cancel: unknown id
        ("PUT", "/v1/generations/" + "a" * 32, {}, b"", 405),
        ("POST", "/v1/generations/" + "a" * 32 + "/events", {}, b"", 405),
        ("PATCH", "/v1/models", {"content-type": "application/json"}, b"{}", 405),
        ("GET", "/v2/anything", {}, b"", 404),
        ("GET", "/v1/generations/../../etc/passwd", {}, b"", 404),
        ("GET", "/v1/generations/" + "a" * 32 + "/images/-1.png", {}, b"", 404),
        ("GET", "/v1/generations/" + "a" * 32 + "/images/99999999999999999999999.png", {}, b"", 404),
        ("GET", "/v1/generations/" + "x" * 5000, {}, b"", 404),
        ("POST", "/healthz", {}, b"", 405),
    ],
)
def test_malformed_requests_are_4xx(api, method, path, headers, body, want):
    r = api.client.request(method, path, headers=headers, content=body)
    assert r.status_code == want, (r.status_code, r.text[:300])
    assert isinstance(r.json()["message"], str) and r.json()["message"], r.text[:300]


@pytest.mark.parametrize(
    "body, want, words",
    [
        (b'{"model": "tiny", "steps": "\xff\xfe"}', 400, ["not valid UTF-8", "invalid start byte at byte offset 28"]),
        (b"[" * 1000 + b"]" * 1000, 400, ["nested too deeply"]),
        (
            b'{"model": "tiny",\n "steps": 2\n "solver": "ddim"}',
            422,
            ["invalid JSON", "Expecting ','", "line 3, column 2"],
        ),
        (b'{"model": "tiny", "steps": 2,, "solver": "ddim"}', 422, ["invalid JSON", "line 1, column 30"]),
        (b'{"model": "tiny"', 422, ["invalid JSON", "line 1, column 17"]),
    ],
    ids=["invalid-utf8", "deeply-nested", "missing-comma", "double-comma", "truncated"],
)
def test_unparseable_bodies_say_what_is_wrong_and_where(api, body, want, words):
    r = api.client.post("/v1/generations", headers={"content-type": "application/json"}, content=body)
    assert r.status_code == want, r.text[:300]
    for w in words:
        assert w in r.json()["message"], r.json()["message"]


def test_ids_that_are_not_32_hex_digits_are_404_as_documented(api):
    """docs/api.md: 404 for an unknown id, including one that is not 32 hex digits."""
    for gen_id in ("nothex", "A" * 32, "a" * 31, "a" * 33):
        for path in (f"/v1/generations/{gen_id}", f"/v1/generations/{gen_id}/images/0.png"):
            r = api.client.get(path)
            assert r.status_code == 404 and "32 lowercase hex digits" in r.json()["message"], (path, r.text)
    r = api.client.get("/v1/generations/" + "a" * 32)
    assert r.status_code == 404 and "unknown or expired" in r.json()["message"]


def test_chunked_huge_body_is_413_without_reading_it_all(api):
    """No Content-Length: the body is counted as it arrives and refused past the limit."""
    chunk = b"x" * 1000
    req = (
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    req += (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 20 + b"0\r\n\r\n"
    code, raw = raw_http(api, req)
    assert code == 413, raw[:300]


def test_declared_huge_body_is_413_before_it_is_sent(api):
    code, raw = raw_http(
        api,
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000000\r\nConnection: close\r\n\r\n{",
    )
    assert code == 413, raw[:300]


def test_garbage_and_bad_http_never_5xx(api):
    for data in (
        b"GARBAGE\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ):
        try:
            code, _ = raw_http(api, data)
        except (IndexError, ValueError):  # the server closed the connection without an answer: fine
            continue
        assert 400 <= code < 500, (data[:60], code)
    assert api.client.get("/healthz").status_code == 200  # and it is still up

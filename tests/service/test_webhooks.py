"""Webhooks in embedded mode (engine in-process, FastAPI's in-process client): real deliveries over
HTTP to a real receiver on loopback that verifies each signature with the standardwebhooks library,
retries until a receiver that was down comes back, a wrong secret, the event filter, refused
targets at submit time and again at delivery time."""

import base64
import hashlib
import hmac
import time

import pytest
from fastapi.testclient import TestClient
from servicekit import WebhookReceiver, one_thread, wait_until, webhook_secret
from standardwebhooks import Webhook, WebhookVerificationError

from arcdiff.service.app import create_app
from arcdiff.service.settings import Settings
from arcdiff.service.webhook_targets import TargetPolicy

pytestmark = pytest.mark.timeout(300)

SECRET = webhook_secret(b"s")
OTHER = webhook_secret(b"o")
BASE = {"model": "tiny", "steps": 2, "solver": "ddim", "seed": 3}
ATTEMPTS = 20
FAST = {  # quick retries: 0.05, 0.1, 0.2, then every 0.25 s
    "webhook_secret": SECRET,
    "webhook_poll_s": 0.05,
    "webhook_backoff_s": 0.05,
    "webhook_backoff_max_s": 0.25,
    "webhook_attempts": ATTEMPTS,
    "webhook_timeout_s": 5,
}


def make_client(model_dir, **kw):
    kw = {"model_dir": model_dir, "torch_threads": 1, "max_batch": 8, "redis_url": None, **kw}
    return TestClient(create_app(Settings(**kw)))


@pytest.fixture(scope="module")
def client(model_dir):
    """Webhooks on, loopback allowed by the allow-list (the receivers listen on 127.0.0.1)."""
    with one_thread(), make_client(model_dir, webhook_allow_networks="127.0.0.1/32", **FAST) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, 60, "models to load")
        yield c


@pytest.fixture
def receiver():
    rx = WebhookReceiver(SECRET)
    yield rx
    rx.stop()


def deliveries(client, gen_id):
    return client.get(f"/v1/generations/{gen_id}").json()["webhook"]["deliveries"]


def settled(client, gen_id, count):
    """The generation's deliveries once `count` of them exist and none is pending."""

    def check():
        ds = deliveries(client, gen_id)
        return ds if len(ds) == count and all(d["state"] != "pending" for d in ds) else None

    return wait_until(check, 60, f"{count} settled deliveries of {gen_id}", interval=0.05)


def test_events_are_signed_delivered_and_recorded(client, receiver):
    receiver.start()
    hook = {"url": receiver.url, "events": ["queued", "finished"]}
    r = client.post("/v1/generations", json={**BASE, "wait": True, "webhook": hook})
    assert r.status_code == 200 and r.json()["status"] == "finished", r.text
    gen_id = r.json()["id"]
    assert r.json()["webhook"]["url"] == receiver.url and r.json()["webhook"]["events"] == ["queued", "finished"]
    receiver.wait_for(lambda rx: len(rx.events(gen_id)) == 2, 30, "queued and finished")
    assert sorted(receiver.events(gen_id)) == ["generation.finished", "generation.queued"]
    assert not receiver.rejected

    done = next(d for d in receiver.deliveries if d["payload"]["type"] == "generation.finished")
    h = done["headers"]
    assert h["webhook-id"] == f"msg_{gen_id}_finished" and h["content-type"] == "application/json"
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 120
    # the signature as the Standard Webhooks spec defines it, computed here without the library
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + done["body"]
    assert h["webhook-signature"] == "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    # a receiver with another secret, or a body changed on the way, does not verify
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER).verify(done["body"], h)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(done["body"].replace(b'"finished"', b'"failed"'), h)

    data = done["payload"]["data"]
    assert data["id"] == gen_id and data["status"] == "finished" and data["nfe"] == 2
    assert [im["url"] for im in data["images"]] == [f"/v1/generations/{gen_id}/images/0.png"]
    assert "png_base64" not in data["images"][0] and "webhook" not in data
    queued = next(d for d in receiver.deliveries if d["payload"]["type"] == "generation.queued")
    assert queued["payload"]["data"]["status"] == "queued" and queued["headers"]["webhook-id"] == f"msg_{gen_id}_queued"

    got = settled(client, gen_id, 2)
    assert {d["event"] for d in got} == {"queued", "finished"}
    for d in got:
        assert d["state"] == "delivered" and d["next_attempt_at"] is None, d
        assert d["message_id"] == f"msg_{gen_id}_{d['event']}"
        [attempt] = d["attempts"]
        assert attempt["status_code"] == 204 and attempt["error"] is None and attempt["duration_ms"] >= 0
        assert attempt["at"].endswith("Z")
    # a generation without a webhook says so
    plain = client.post("/v1/generations", json=BASE).json()
    assert plain["webhook"] is None and client.get(plain["url"]).json()["webhook"] is None


def test_a_receiver_that_is_down_gets_the_event_once_it_is_back(client, receiver):
    """Nothing listens on the receiver's port at first: attempts fail (recorded), back off, and the
    one after it starts delivers; the receiver gets the event once."""
    r = client.post("/v1/generations", json={**BASE, "webhook": {"url": receiver.url}})
    assert r.status_code == 202, r.text
    gen_id = r.json()["id"]

    def failed_twice():
        ds = deliveries(client, gen_id)
        return ds if ds and len(ds[0]["attempts"]) >= 2 else None

    [pending] = wait_until(failed_twice, 60, "two failed attempts", interval=0.05)
    assert pending["event"] == "finished" and pending["state"] == "pending", pending
    assert pending["next_attempt_at"] is not None
    for attempt in pending["attempts"]:
        assert attempt["status_code"] is None and attempt["error"].startswith("ConnectError"), attempt

    receiver.start()
    [done] = settled(client, gen_id, 1)
    assert done["state"] == "delivered", done
    *failed, last = done["attempts"]
    assert len(failed) >= 2 and all(a["error"] and a["status_code"] is None for a in failed)
    assert last["status_code"] == 204 and last["error"] is None
    assert len(done["attempts"]) < ATTEMPTS
    assert receiver.events(gen_id) == ["generation.finished"]


def test_a_receiver_with_another_secret_refuses_every_attempt(client):
    """The receiver verifies with a secret that is not the server's: each attempt is answered 401
    (recorded), until the attempts run out and the delivery fails."""
    wrong = WebhookReceiver(OTHER).start()
    try:
        r = client.post("/v1/generations", json={**BASE, "wait": True, "webhook": {"url": wrong.url}})
        gen_id = r.json()["id"]
        [d] = settled(client, gen_id, 1)
        assert d["state"] == "failed" and len(d["attempts"]) == ATTEMPTS, d
        assert all(a["status_code"] == 401 for a in d["attempts"])
        assert not wrong.deliveries and len(wrong.rejected) == ATTEMPTS
        assert {x["reason"] for x in wrong.rejected} == {"No matching signature found"}
        assert {x["headers"]["webhook-id"] for x in wrong.rejected} == {f"msg_{gen_id}_finished"}
    finally:
        wrong.stop()


def test_only_the_events_asked_for_are_sent(client, receiver):
    """events ["canceled"]: a canceled generation sends that and nothing else (no queued)."""
    receiver.start()
    hook = {"url": receiver.url, "events": ["canceled"]}
    r = client.post("/v1/generations", json={**BASE, "steps": 1000, "n": 4, "webhook": hook})
    gen_id = r.json()["id"]
    assert client.delete(f"/v1/generations/{gen_id}").json()["status"] == "canceled"
    receiver.wait_for(lambda rx: rx.events(gen_id), 30, "the canceled event")
    [d] = settled(client, gen_id, 1)
    assert d["event"] == "canceled" and d["state"] == "delivered"
    assert receiver.events(gen_id) == ["generation.canceled"]
    [canceled] = [x for x in receiver.deliveries if x["payload"]["data"]["id"] == gen_id]
    assert canceled["payload"]["data"]["status"] == "canceled"


def test_the_address_is_checked_again_at_delivery(client, receiver):
    """A host allowed at submit time but refused when the delivery is due (its name now points at a
    refused address, as in DNS rebinding; here: the operator's allow-list changed) is not called:
    the delivery fails with the reason, and the receiver gets nothing."""
    receiver.start()
    webhooks = client.app.state.webhooks
    allowed = webhooks.policy
    r = client.post("/v1/generations", json={**BASE, "steps": 1000, "n": 4, "webhook": {"url": receiver.url}})
    assert r.status_code == 202, r.text
    gen_id = r.json()["id"]
    webhooks.policy = TargetPolicy()  # the defaults: loopback refused
    try:
        client.delete(f"/v1/generations/{gen_id}")
        [d] = settled(client, gen_id, 1)
    finally:
        webhooks.policy = allowed
    assert d["state"] == "failed" and len(d["attempts"]) == 1, d
    assert d["attempts"][0]["error"] == "refused: 127.0.0.1 is a loopback address, which webhooks may not reach here"
    assert receiver.events(gen_id) == []


@pytest.fixture(scope="module")
def strict(model_dir):
    """Webhooks on with the default policy: only public addresses."""
    with make_client(model_dir, webhook_secret=SECRET) as c:
        yield c


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://127.0.0.1:8000/hook", "127.0.0.1 is a loopback address"),
        ("http://localhost:8000/hook", "host localhost: "),  # resolved: ::1 or 127.0.0.1
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]/hook", "::ffff:7f00:1 is a loopback address"),
        ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
        ("https://192.168.0.10/hook", "192.168.0.10 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://224.0.0.1/hook", "224.0.0.1 is a multicast address"),
        ("http://0.0.0.0:8000/hook", "0.0.0.0 is an unspecified address"),
        ("http://240.0.0.1/hook", "240.0.0.1 is a reserved address"),
        ("http://100.64.0.1/hook", "100.64.0.1 is not a globally routable address"),
    ],
)
def test_private_targets_are_refused_by_default(strict, url, why):
    r = strict.post("/v1/generations", json={**BASE, "webhook": {"url": url}})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["message"].startswith("webhook.url: refused: ") and why in body["message"], body["message"]
    assert "which webhooks may not reach here" in body["message"]
    assert body["detail"][0]["loc"] == ["body", "webhook", "url"]


@pytest.mark.parametrize(
    "hook, words",
    [
        ({"url": "ftp://example.com/hook"}, "webhook.url: Value error, the scheme must be http or https"),
        ({"url": "file:///etc/passwd"}, "webhook.url: Value error, the scheme must be http or https"),
        ({"url": "http://example.com/" + "a" * 2100}, "webhook.url: String should have at most 2048 characters"),
        ({"url": "no url at all"}, "webhook.url: Value error, the URL contains whitespace"),
        ({"url": "http:///hook"}, "webhook.url: Value error, the URL has no host"),
        ({"url": "http://example.com/x#frag"}, "webhook.url: Value error, the URL has a #fragment"),
        ({"url": ""}, "webhook.url: String should have at least 1 character"),
        ({"url": 7}, "webhook.url: Input should be a valid string"),
        ({"url": "http://example.com/", "events": []}, "webhook.events: List should have at least 1 item"),
        ({"url": "http://example.com/", "events": ["progress"]}, "webhook.events.0: Input should be 'queued'"),
        ({"url": "http://example.com/", "events": ["failed", "failed"]}, "webhook.events: Value error, each event"),
        ({"url": "http://example.com/", "secret": "x"}, "webhook.secret: Extra inputs are not permitted"),
        ({"events": ["failed"]}, "webhook.url: Field required"),
        ("http://example.com/", "webhook: Input should be a valid dictionary or object"),
        (None, "webhook: Input should be a valid dictionary or object"),
    ],
)
def test_bad_webhooks_are_422_naming_the_problem(strict, hook, words):
    r = strict.post("/v1/generations", json={**BASE, "webhook": hook})
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(words), r.json()["message"]


def test_without_a_secret_a_webhook_is_422(model_dir):
    with make_client(model_dir) as c:
        r = c.post("/v1/generations", json={**BASE, "webhook": {"url": "https://93.184.216.34/hook"}})
    assert r.status_code == 422, r.text
    assert r.json()["message"] == (
        "webhook: this server sends no webhooks (the operator has set no ARCDIFF_WEBHOOK_SECRET)"
    )


def test_secret_setting_must_be_whsec_base64():
    from pydantic import ValidationError

    for bad, words in (
        ("plain-secret", "whsec_"),
        ("whsec_not base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24..64 bytes"),
    ):
        with pytest.raises(ValidationError, match=words):
            Settings(webhook_secret=bad)
    with pytest.raises(ValidationError, match="CIDR"):
        Settings(webhook_allow_networks="10.0.0.0/8,not-a-net")
    assert Settings(webhook_secret=SECRET).webhook_secret.get_secret_value() == SECRET
    assert SECRET not in repr(Settings(webhook_secret=SECRET))

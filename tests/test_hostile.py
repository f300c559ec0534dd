"""Hostile inputs against a real `loragen serve`, as raw bytes on a socket: every one is refused with a 4xx
(the error envelope whenever the request reaches the app), the service stays healthy, and what it had
stored is neither lost nor corrupted. The cases live in tests/hostile.py (the reliability runner sends
the same ones)."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from tests.hostile import hostile_cases, raw_request
from tests.service_server import ServiceProcess
from tests.test_service import ckpt_dir  # noqa: F401  (the checkpoint fixture: E = 384)

MAX_BODY = 2 * 1024 * 1024  # over 1 MB, so a 1 MB description meets the text limit, not the body limit
E = 384
NAMES = [c.name for c in hostile_cases(max_body_bytes=MAX_BODY, emb_dim=E, known_id="0" * 64)]


@pytest.fixture(scope="module")
def server(ckpt_dir, tmp_path_factory):  # noqa: F811
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path_factory.mktemp("hostile") / "serve.log",
                          {"LORAGEN_MAX_BODY_BYTES": str(MAX_BODY)})
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stored(server):
    """An adapter the service holds before the hostile requests: (id, sha256 of its bytes)."""
    r = httpx.post(server.url + "/generate", json={"task": "kept safe through hostile traffic"}, timeout=60)
    assert r.status_code == 200
    return r.headers["x-adapter-id"], hashlib.sha256(r.content).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_hostile_input_is_refused(server, stored, name):
    case = {c.name: c for c in hostile_cases(max_body_bytes=MAX_BODY, emb_dim=E, known_id=stored[0])}[name]
    r = raw_request(server.port, case.request)
    assert case.check(r) == [], f"{name}: {case.check(r)}"
    assert 400 <= r.status < 500
    health = httpx.get(server.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_stored_adapter_survives_hostile_traffic(server, stored):
    adapter_id, digest = stored
    got = httpx.get(f"{server.url}/v1/adapters/{adapter_id}", timeout=30)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == digest
    again = httpx.post(server.url + "/generate", json={"task": "kept safe through hostile traffic"}, timeout=60)
    assert again.headers["x-cache"] == "hit" and hashlib.sha256(again.content).hexdigest() == digest
    assert "Traceback" not in server.log_path.read_text()  # no hostile input reached an unhandled error


def test_plain_text_outside_the_refused_code_points_still_works(server):
    """The new refusals (NUL, lone surrogates, non-JSON content types) leave ordinary input alone: text with
    other control characters and astral code points, and JSON sent as application/json; charset=utf-8 or
    without a Content-Type."""
    for body, ctype in [('{"task": "tab\\there, emoji \\ud83d\\ude00, bell \\u0007"}', "application/json; charset=utf-8"),
                        ('{"task": "no content type header"}', None)]:
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(server.url + "/generate", content=body.encode(), headers=headers, timeout=60)
        assert r.status_code == 200, r.text

"""Schema fuzzing: schemathesis generates requests from the service's own /openapi.json, valid and invalid,
for every operation, and sends them to a real `loragen serve`. No response may be a 5xx, and every response
must conform to the schema (its status documented, its content type and body as documented: adapters as
octet-stream, errors as the envelope). Bounded: LORAGEN_FUZZ_EXAMPLES examples per operation and mode
(default 25; the reliability runner sends more). Each test stands alone: none reads what another recorded,
so any order, or any one test alone, gives the same result."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service_server import ServiceProcess
from tests.test_service import ckpt_dir  # noqa: F401  (the checkpoint fixture)

EXAMPLES = int(os.environ.get("LORAGEN_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
# operations whose valid requests must get some 2xx answers, to show the fuzzer reached past validation (not
# the batch: the schema cannot say "exactly one of task, document, embedding", so a generated batch of several
# inputs almost always holds an invalid one; tests/test_service.py covers valid batches)
GETS_PAST_VALIDATION = ("POST /generate", "POST /v1/adapters", "GET /v1/checkpoints", "GET /health", "GET /ready",
                        "GET /metrics")


@pytest.fixture(scope="module")
def fuzz_server(ckpt_dir, tmp_path_factory):  # noqa: F811
    env = {"LORAGEN_MAX_BATCH": "4", "LORAGEN_MAX_TEXT_CHARS": "4000"}
    proc = ServiceProcess({"tiny": ckpt_dir}, tmp_path_factory.mktemp("fuzz") / "serve.log", env)
    yield proc
    proc.stop()


def _schema() -> dict:
    """The OpenAPI document the app serves (routes do not depend on settings; the test checks it is the same)."""
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings()).openapi()


SCHEMA = schemathesis.openapi.from_dict(_schema())
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def test_the_served_schema_is_the_one_fuzzed(fuzz_server):
    assert httpx.get(fuzz_server.url + "/openapi.json", timeout=30).json() == _schema()
    assert len(OPERATIONS) >= 9


def _takes_input(label: str) -> bool:
    method, path = label.split(" ", 1)
    op = _schema()["paths"][path][method.lower()]
    return bool(op.get("parameters") or op.get("requestBody"))


# negative mode needs an input to get wrong: operations without any get the positive mode only
CASES = [(label, mode) for label in sorted(OPERATIONS) for mode in MODES
         if mode is GenerationMode.POSITIVE or _takes_input(label)]


@pytest.mark.parametrize("label,mode", CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_every_operation_conforms_and_never_5xx(fuzz_server, label, mode):
    seen: set[int] = set()  # statuses answered in this test

    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    def fuzz(case):
        response = case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=60)
        seen.add(response.status_code)

    fuzz()
    assert seen and max(seen) < 500, seen
    if mode is GenerationMode.POSITIVE and label in GETS_PAST_VALIDATION:  # the fuzzer got past validation
        assert any(200 <= s < 300 for s in seen), (label, seen)


def test_the_fuzzer_covers_every_operation():
    """Every operation is fuzzed (valid requests; invalid ones too where it takes input), and each that must get
    past validation is among them."""
    fuzzed = {label for label, mode in CASES if mode is GenerationMode.POSITIVE}
    assert fuzzed == set(OPERATIONS), fuzzed ^ set(OPERATIONS)
    assert set(GETS_PAST_VALIDATION) <= fuzzed, set(GETS_PAST_VALIDATION) - fuzzed

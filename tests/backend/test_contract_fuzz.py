"""Contract fuzzing: schemathesis generates requests from the server's own OpenAPI document
and sends them, with the token, to the real server on a loopback port.

Every operation gets ``ANALOGON_FUZZ_EXAMPLES`` requests that fit the document (default 150)
and as many that do not (wrong types, out-of-range numbers, broken patterns, missing fields;
invalid job bodies: a fifth as many, they are slow to generate).
The run fails on any 5xx, on a status or body that the document does not list for the
operation, on a wrong Content-Type, and on a server that stops answering ``/v1/health``.
About 2,800 requests in all; docs/hardening.md says what is covered and how to run it longer.
"""
from __future__ import annotations

import os
import time

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_headers_conformance, response_schema_conformance,
    status_code_conformance,
)

from analogon.server import Settings, ServerThread  # noqa: E402
from analogon.server.store import RGBA, Limits  # noqa: E402

EXAMPLES = int(os.environ.get("ANALOGON_FUZZ_EXAMPLES", "150"))
# invalid job bodies are slow to generate from the per-method schemas (about 1 s each on a
# loaded 2-core machine): fewer of them, unless a longer run is asked for
JOB_NEGATIVE_EXAMPLES = int(os.environ.get("ANALOGON_FUZZ_JOB_NEGATIVE_EXAMPLES", str(max(10, EXAMPLES // 5))))
SEED = os.environ.get("ANALOGON_FUZZ_SEED", "15")  # "random": a new run each time
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]


@schemathesis.serializer(RGBA)
def _raw_rgba(ctx, value):  # the raw upload format: bytes as they are
    return value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    settings = Settings(port=0, state_dir=tmp_path_factory.mktemp("fuzz-state"), cache_dir="", device="cpu",
                        limits=Limits(max_body_bytes=4 * 1024 * 1024, max_side=1024, max_pixels=1024 * 1024))
    with ServerThread(settings) as srv:
        yield srv


def _healthy(url: str) -> bool:
    try:
        r = httpx.get(url + "/v1/health", timeout=30)
        return r.status_code == 200 and r.json()["status"] == "ok"
    except httpx.HTTPError:
        return False


def test_the_server_keeps_its_contract_under_fuzzing(server):
    auth = {"Authorization": f"Bearer {server.token}"}
    doc = httpx.get(server.url + "/openapi.json", headers=auth, timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 11, [op.label for op in operations]
    sent: dict[str, int] = {}
    statuses: dict[int, int] = {}
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            n = JOB_NEGATIVE_EXAMPLES if (op.label == "POST /v1/jobs"
                                          and mode == schemathesis.GenerationMode.NEGATIVE) else EXAMPLES

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=n, deadline=None, database=None, print_blob=True,
                      derandomize=SEED != "random", phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def run(case):
                response = case.call(base_url=server.url, headers=auth, timeout=30)
                sent[op.label] = sent.get(op.label, 0) + 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                case.validate_response(response, checks=CHECKS, headers=auth)

            t_op = time.monotonic()
            try:
                run()
            except Unsatisfiable:
                # an operation with nothing to get wrong (no parameters, no body) has no negative cases
                assert mode == schemathesis.GenerationMode.NEGATIVE, op.label
            timings[f"{op.label} {mode}"] = time.monotonic() - t_op
            assert _healthy(server.url), f"the server stopped answering health after {op.label} ({mode})"

    total = sum(sent.values())
    print(f"\ncontract fuzzing: {total} requests in {time.monotonic() - t0:.0f} s; statuses {sorted(statuses.items())}")
    for label, n in sorted(sent.items()):
        print(f"  {n:5d}  {label}")
    for label, t in sorted(timings.items(), key=lambda kv: -kv[1]):
        print(f"  {t:6.1f} s  {label}")
    assert all(sent.get(op.label, 0) >= EXAMPLES // 2 or op.label.startswith(("GET /v1/health", "HEAD /v1/health"))
               for op in operations), sent  # every operation ran
    assert _healthy(server.url)

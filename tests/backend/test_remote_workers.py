"""Several devices on one server (issue 31), tested with two CPU workers: one queue drained by
both, each worker with its own models (no module shared between devices)."""
from __future__ import annotations

import time

import httpx
import pytest

from analogon import methods
from analogon.errors import AnalogonError
from analogon.server import Settings, ServerThread
from analogon.server.workers import check_devices, parse_devices
from test_engine_methods import EchoMethod
from test_server import events, image, upload


@pytest.fixture(scope="module")
def echo():
    m = methods.register(EchoMethod())
    yield m
    methods.unregister(m.id)


@pytest.fixture(scope="module")
def server(echo, tmp_path_factory):
    with ServerThread(Settings(port=0, state_dir=tmp_path_factory.mktemp("state"), cache_dir="",
                               devices=["cpu", "cpu"], scan_usual_places=False)) as srv:
        yield srv


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=30) as c:
        yield c


def submit(client, s, seed, steps=1, delay=0.0) -> str:
    r = client.post("/v1/jobs", json={"method": "test-echo", "seed": seed, "images": {"source": s},
                                      "params": {"steps": steps, "delay": delay}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_two_workers_drain_one_queue(server, client, echo):
    health = client.get("/v1/health").json()
    assert health["devices"] == ["cpu", "cpu"] and [w["id"] for w in health["workers"]] == [0, 1]
    s = upload(client, image(seed=501))
    ids = [submit(client, s, seed=600 + i, steps=4, delay=0.1) for i in range(6)]
    busy_together = False
    deadline = time.monotonic() + 30
    while not busy_together and time.monotonic() < deadline:
        busy_together = all(w["busy"] for w in client.get("/v1/health").json()["workers"])
        time.sleep(0.02)
    assert busy_together  # both workers ran jobs at the same time
    for j in ids:
        assert events(client, j)[-1][0] == "done"
    statuses = [client.get(f"/v1/jobs/{j}").json() for j in ids]
    assert {st["worker"] for st in statuses} == {0, 1}
    assert all(st["device"] == "cpu" for st in statuses)
    assert sorted(c["seed"] for c in echo.calls if 600 <= c["seed"] < 606) == list(range(600, 606))  # each once
    started = [d for k, d in events(client, ids[0]) if k == "started"][0]
    assert started["worker"] in (0, 1) and started["device"] == "cpu"
    runs = {w["id"]: w["jobs_run"] for w in client.get("/v1/health").json()["workers"]}
    assert runs[0] >= 1 and runs[1] >= 1


def test_each_worker_has_its_own_models(server, client, echo):
    s = upload(client, image(seed=502))
    ids = [submit(client, s, seed=700 + i, steps=3, delay=0.1) for i in range(4)]
    for j in ids:
        assert events(client, j)[-1][0] == "done"
    workers = server.app.state.queue.workers
    bundles = [w.models._models.get("tiny-sd") for w in workers]
    assert all(b is not None for b in bundles), "each worker loaded the model for its own jobs"
    a, b = bundles
    assert a is not b and a.pipe is not b.pipe and a.pipe.unet is not b.pipe.unet
    pa, pb = next(a.pipe.unet.parameters()), next(b.pipe.unet.parameters())
    assert pa.data_ptr() != pb.data_ptr()  # no shared storage either
    assert client.get("/v1/health").json()["loaded_models"] == ["tiny-sd"]


def test_cancel_reaches_the_job_on_either_worker(server, client):
    s = upload(client, image(seed=503))
    ids = [submit(client, s, seed=800 + i, steps=50, delay=0.1) for i in range(2)]
    deadline = time.monotonic() + 30
    while not all(client.get(f"/v1/jobs/{j}").json()["status"] == "running" for j in ids):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert {client.get(f"/v1/jobs/{j}").json()["worker"] for j in ids} == {0, 1}
    t0 = time.monotonic()
    for j in ids:
        assert client.delete(f"/v1/jobs/{j}").json()["cancel_requested"] is True
    for j in ids:
        assert events(client, j)[-1][0] == "cancelled"
    assert time.monotonic() - t0 < 5


def test_one_worker_by_default(tmp_path):
    with ServerThread(Settings(port=0, state_dir=tmp_path, cache_dir="", device="cpu",
                               scan_usual_places=False)) as srv:
        h = httpx.get(srv.url + "/v1/health").json()
        assert h["devices"] == ["cpu"] and len(h["workers"]) == 1


def test_devices_are_checked_before_anything_loads():
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    for bad in ("", "cpu,,cpu", ","):
        with pytest.raises(AnalogonError) as e:
            parse_devices(bad)
        assert e.value.code == "bad_device"
    assert check_devices(["cpu", "cpu", None]) == ["cpu", "cpu", None]
    for bad in (["cpu", "not-a-device"], ["cuda:63"]):
        with pytest.raises(AnalogonError) as e:
            check_devices(bad)
        assert e.value.code == "bad_device"

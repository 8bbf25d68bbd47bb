"""Several painters on one server (issue 31): a token per painter (only hashes kept), each
painter sees only their own jobs and images, fair turns between painters' queued jobs,
per-token limits, and revocation without a restart. Real loopback server, test-echo jobs."""
from __future__ import annotations

import os
import stat
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from analogon import cli, methods
from analogon.core.images import raw_image_id
from analogon.errors import AnalogonError
from analogon.server import Settings, ServerThread, painters
from analogon.server.jobs import JobQueue
from test_engine_methods import EchoMethod
from test_server import assert_error, events, image, upload

KEEP_S = 1.0  # painter_keep_s of the server below


@pytest.fixture(scope="module")
def echo():
    m = methods.register(EchoMethod())
    yield m
    methods.unregister(m.id)


@pytest.fixture(scope="module")
def server(echo, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    with ServerThread(Settings(port=0, state_dir=state, cache_dir="", device="cpu", scan_usual_places=False,
                               painter_keep_s=KEEP_S)) as srv:
        yield srv


def tokens_file(server):
    return server.settings.resolved_state_dir() / painters.TOKENS_FILE


def painter(server, name, **limits) -> httpx.Client:
    token = painters.create_token(tokens_file(server), name, **limits)
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=30) as c:
        yield c


def submit(client, s, seed, steps=1, delay=0.0) -> str:
    r = client.post("/v1/jobs", json={"method": "test-echo", "seed": seed, "images": {"source": s},
                                      "params": {"steps": steps, "delay": delay}})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def wait_running(client, job_id):
    deadline = time.monotonic() + 20
    while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def wait_end(client, job_id) -> dict:
    deadline = time.monotonic() + 30
    while (st := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return st


def put_raw(client, rgba) -> httpx.Response:
    h, w = rgba.shape[:2]
    data = np.ascontiguousarray(rgba).tobytes()
    return client.put(f"/v1/images/{raw_image_id(data, w, h)}", content=data, headers={
        "Content-Type": "application/x-analogon-rgba", "X-Image-Width": str(w), "X-Image-Height": str(h)})


def test_tokens_file_keeps_only_hashes(tmp_path, capsys):
    state = tmp_path / "state"
    assert cli.main(["tokens", "--state-dir", str(state), "create", "alice", "--max-queued", "3",
                     "--max-stored", "500M"]) == 0
    token = capsys.readouterr().out.strip()
    path = state / painters.TOKENS_FILE
    assert len(token) >= 40 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert token not in text and painters.token_hash(token) in text
    p = painters.read_tokens(path)["alice"]
    assert p.active and p.max_queued == 3 and p.max_stored_bytes == 500 * 1024**2
    assert cli.main(["tokens", "--state-dir", str(state), "create", "alice"]) == 1  # has a live token
    assert "painter_exists" in capsys.readouterr().err
    assert cli.main(["tokens", "--state-dir", str(state), "create", "bad name!"]) == 1
    assert cli.main(["tokens", "--state-dir", str(state), "create", "bob"]) == 0
    capsys.readouterr()
    assert cli.main(["tokens", "--state-dir", str(state), "revoke", "alice"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli.main(["tokens", "--state-dir", str(state), "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows == {"alice": "revoked", "bob": "active"} and token not in out
    assert cli.main(["tokens", "--state-dir", str(state), "revoke", "nobody"]) == 1
    assert cli.main(["tokens", "--state-dir", str(state), "create", "alice"]) == 0  # a new one after revoking
    new = capsys.readouterr().out.strip()
    assert new != token and painters.read_tokens(path)["alice"].active


def test_who_is_asking(server, admin):
    with painter(server, "hal", max_queued=4) as hal:
        body = hal.get("/v1/health").json()
        assert body["authenticated"] is True and body["painter"] == {
            "name": "hal", "max_queued": 4, "max_stored_bytes": server.settings.painter_max_stored_bytes,
            "active_jobs": 0, "stored_bytes": 0}
        assert hal.get("/v1/methods").status_code == 200
        # a painter cannot fill the server's disk with models
        r = hal.post("/v1/downloads", json={"model": "sd15"})
        assert_error(r, 403, "painter_not_allowed")
    assert admin.get("/v1/health").json()["painter"] is None
    anon = httpx.get(server.url + "/v1/health").json()
    assert anon["authenticated"] is False and "painter" not in anon
    assert_error(httpx.get(server.url + "/v1/methods", headers={"Authorization": "Bearer nope"}), 401, "unauthorized")


def test_a_painter_sees_only_their_own_jobs_and_images(server, admin, echo):
    with painter(server, "ann") as ann, painter(server, "ben") as ben:
        s = upload(ann, image(seed=311))
        job = submit(ann, s, seed=5)
        assert events(ann, job)[-1][0] == "done"
        done = ann.get(f"/v1/jobs/{job}").json()
        assert done["owner"] == "ann" and done["worker"] == 0 and done["device"] == "cpu"
        result = done["result"]["images"][0]["sha"]
        # another painter's job answers exactly as an unknown id
        unknown = "0" * 32
        for verb, path in (("GET", "/v1/jobs/{}"), ("DELETE", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/events")):
            theirs, none = ben.request(verb, path.format(job)), ben.request(verb, path.format(unknown))
            assert_error(theirs, 404, "job_not_found")
            assert_error(none, 404, "job_not_found")
            assert theirs.json()["message"] == none.json()["message"]
        assert ann.get(f"/v1/jobs/{job}").json()["status"] == "done"  # ben's cancel did nothing
        # lists: each their own; the server's token sees everyone's
        mine = ben.get("/v1/jobs").json()["jobs"]
        assert mine == []
        assert [j["id"] for j in ann.get("/v1/jobs").json()["jobs"]] == [job]
        everyone = {j["id"]: j["owner"] for j in admin.get("/v1/jobs").json()["jobs"]}
        assert everyone[job] == "ann"
        # images: ann's upload and result are hers; ben sees them only once he uploads the same bytes
        for sha in (s, result):
            assert ann.head(f"/v1/images/{sha}").status_code == 200
            assert ben.head(f"/v1/images/{sha}").status_code == 404
            assert_error(ben.get(f"/v1/images/{sha}"), 404, "image_not_found")
            assert admin.head(f"/v1/images/{sha}").status_code == 200
        r = ben.post("/v1/jobs", json={"method": "test-echo", "images": {"source": s}})
        body = assert_error(r, 404, "image_not_found")
        assert body["detail"]["missing"] == [s]
        assert upload(ben, image(seed=311)) == s  # already stored: a no-op that makes it his too
        bens = submit(ben, s, seed=6)
        assert events(ben, bens)[-1][0] == "done"
        assert [j["id"] for j in ben.get("/v1/jobs").json()["jobs"]] == [bens]
        assert_error(ann.get(f"/v1/jobs/{bens}"), 404, "job_not_found")


def test_fair_turns_between_painters(server, admin, echo):
    with painter(server, "cat") as cat, painter(server, "dan") as dan:
        s = upload(cat, image(seed=312))
        assert upload(dan, image(seed=312)) == s
        blocker = submit(cat, s, seed=1000, steps=50, delay=0.05)
        wait_running(cat, blocker)
        first = len(echo.calls)
        cats = [submit(cat, s, seed=1001 + i) for i in range(5)]
        dans = [submit(dan, s, seed=2001)]
        # dan's single job waits behind one of cat's five, not all of them
        pos = {j: (cat if j in cats else dan).get(f"/v1/jobs/{j}").json()["position"] for j in cats + dans}
        assert [pos[j] for j in cats] == [1, 3, 4, 5, 6] and pos[dans[0]] == 2
        dans.append(submit(dan, s, seed=2002))  # dan's second comes after cat's second
        assert dan.get(f"/v1/jobs/{dans[1]}").json()["position"] == 4
        assert cat.delete(f"/v1/jobs/{blocker}").status_code == 200
        for j in cats:
            assert wait_end(cat, j)["status"] == "done"
        for j in dans:
            assert wait_end(dan, j)["status"] == "done"
        order = [c["seed"] for c in echo.calls[first:] if c["seed"] != 1000]  # the blocker may log late
        assert order == [1001, 2001, 1002, 2002, 1003, 1004, 1005], order


def test_round_robin_picks_in_turns():
    """The queue's own choice, without a server: owners take turns in the order they arrived."""
    q = JobQueue(store=None, models=None, cache=None)

    def job(tag):
        return SimpleNamespace(method=SimpleNamespace(id="x"), refs={}, model="m", seed=0, tag=tag)

    for owner, tags in (("a", ["a1", "a2", "a3"]), ("b", ["b1", "b2"]), (None, ["s1"])):
        for t in tags:
            q.submit(job(t), owner=owner)
    with q._cond:
        planned = [j.prepared.tag for j in q._pick_order()]
        taken = [q._take().prepared.tag for _ in range(3)]
    assert planned == ["a1", "b1", "s1", "a2", "b2", "a3"]
    assert taken == planned[:3]
    q.submit(job("c1"), owner="c")  # a newcomer waits for one turn of those waiting
    with q._cond:
        rest = []
        while q._queues:
            rest.append(q._take().prepared.tag)
    assert rest == ["a2", "b2", "c1", "a3"]


def test_limit_on_queued_jobs(server, echo):
    with painter(server, "eva", max_queued=2) as eva, painter(server, "fay") as fay:
        s = upload(eva, image(seed=313))
        a = submit(eva, s, seed=3001, steps=50, delay=0.05)
        b = submit(eva, s, seed=3002, steps=50, delay=0.05)
        r = eva.post("/v1/jobs", json={"method": "test-echo", "images": {"source": s}})
        body = assert_error(r, 429, "too_many_jobs")
        assert body["detail"] == {"active": 2, "max_queued": 2} and "cancel" in body["message"]
        assert upload(fay, image(seed=313)) == s
        c = submit(fay, s, seed=3003)  # another painter is not held back
        assert eva.get("/v1/health").json()["painter"]["active_jobs"] == 2
        assert eva.delete(f"/v1/jobs/{b}").status_code == 200
        d = submit(eva, s, seed=3004)  # room again
        assert eva.delete(f"/v1/jobs/{a}").status_code == 200
        assert wait_end(eva, d)["status"] == "done" and wait_end(fay, c)["status"] == "done"


def test_limit_on_stored_bytes(server, admin, echo):
    limit = 2500  # two 16x16 raw images (1024 bytes each), not three
    with painter(server, "gil", max_stored_bytes=limit) as gil:
        imgs = [image(seed=400 + i) for i in range(5)]
        ids = []
        for im in imgs[:2]:
            r = put_raw(gil, im)
            assert r.status_code == 201, r.text
            ids.append(r.json()["sha"])
        r = put_raw(gil, imgs[2])  # the two are fresh (used within painter_keep_s): kept, so refused
        body = assert_error(r, 413, "storage_quota")
        assert body["detail"] == {"stored_bytes": 2048, "upload_bytes": 1024, "max_stored_bytes": limit}
        assert admin.head(f"/v1/images/{r.request.url.path.rsplit('/', 1)[1]}").status_code == 404
        # a job that reads the second image keeps it; the first, unused for a while, is released
        blocker = submit(gil, ids[1], seed=4000, steps=50, delay=0.1)
        time.sleep(KEEP_S + 0.1)
        r = put_raw(gil, imgs[2])
        assert r.status_code == 201, r.text
        ids.append(r.json()["sha"])
        assert admin.head(f"/v1/images/{ids[0]}").status_code == 404  # gone: nobody else kept it
        assert gil.head(f"/v1/images/{ids[1]}").status_code == 200
        assert gil.get("/v1/health").json()["painter"]["stored_bytes"] == 2048
        time.sleep(KEEP_S + 0.1)
        r = put_raw(gil, imgs[3])  # the job's image is kept, the newer unused one goes
        assert r.status_code == 201, r.text
        assert gil.head(f"/v1/images/{ids[1]}").status_code == 200
        assert admin.head(f"/v1/images/{ids[2]}").status_code == 404
        big = image(25, 25, seed=9)  # 2500 bytes alone, and the job's 1024 stay
        assert_error(put_raw(gil, big), 413, "storage_quota")
        assert gil.delete(f"/v1/jobs/{blocker}").status_code == 200
        assert wait_end(gil, blocker)["status"] == "cancelled"


def test_revocation_takes_effect_without_a_restart(server, admin, echo):
    path = tokens_file(server)
    with painter(server, "ivy") as ivy, painter(server, "jon") as jon:
        s = upload(ivy, image(seed=314))
        assert upload(jon, image(seed=314)) == s
        blocker = submit(jon, s, seed=5000, steps=50, delay=0.05)
        wait_running(jon, blocker)
        queued = submit(ivy, s, seed=5001)
        first = len(echo.calls)
        painters.revoke_token(path, "ivy")
        r = ivy.get("/v1/methods")
        body = assert_error(r, 401, "unauthorized")
        assert "revoked" in body["message"] and "ivy" in body["message"]
        assert jon.get("/v1/methods").status_code == 200  # others go on
        assert jon.delete(f"/v1/jobs/{blocker}").status_code == 200
        st = wait_end(admin, queued)  # its turn came after the revocation: not run
        assert st["status"] == "error" and st["error"]["code"] == "token_revoked"
        assert all(c["seed"] != 5001 for c in echo.calls[first:])
        token = painters.create_token(path, "ivy")  # a new token works; the old one stays refused
        assert httpx.get(server.url + "/v1/methods", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert_error(ivy.get("/v1/methods"), 401, "unauthorized")


def test_a_tokens_file_that_cannot_be_read_accepts_no_painter(server, admin):
    path = tokens_file(server)
    with painter(server, "kim") as kim:
        assert kim.get("/v1/methods").status_code == 200
        saved = path.read_bytes()
        path.write_text("{ not json")
        try:
            assert_error(kim.get("/v1/methods"), 401, "unauthorized")
            assert admin.get("/v1/methods").status_code == 200  # the server's own token still works
        finally:
            tmp = path.with_name("restore.tmp")
            tmp.write_bytes(saved)
            os.replace(tmp, path)
        assert kim.get("/v1/methods").status_code == 200


def test_bad_names_are_refused(tmp_path):
    for bad in ("", "a b", "../x", "-x", "x" * 65):
        with pytest.raises(AnalogonError) as e:
            painters.create_token(tmp_path / "t.json", bad)
        assert e.value.code == "bad_painter_name"

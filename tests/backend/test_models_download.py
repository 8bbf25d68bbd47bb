"""Getting a model from a stand-in hub on 127.0.0.1 (huggingface_hub with endpoint= pointing
at it): progress, resume after an interrupted download, a SHA-256 mismatch refused, cancel,
nothing half-written in the models folder, and the server's /v1/downloads."""
from __future__ import annotations

import errno
import hashlib
from pathlib import Path
import os
import re
import subprocess
import sys
import threading
import time
from collections import namedtuple

import httpx
import numpy as np
import pytest

from analogon.errors import AnalogonError
from analogon.models import discovery
from analogon.models import download as dl
from analogon.models.download import STAGING, DownloadCancelled, Downloads, Recommended, download
from fake_hub import FakeHub

REPO = "painters/tiny-checkpoint"
FILE = "tiny.safetensors"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)  # several progress events for a small file
    # the suite runs offline (conftest); these tests reach only the stand-in hub on 127.0.0.1
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with FakeHub() as h:
        yield h


def tiny_checkpoint(size: int = 600_000) -> bytes:
    """A real (small) SD-1.x-shaped safetensors file, padded to about ``size`` bytes."""
    from safetensors.numpy import save

    return save({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((2, 4, 1, 1), np.float16),
                 "cond_stage_model.transformer.text_model.pad": np.arange(size // 4, dtype=np.float32)})


def entry(sha: str | None = None) -> Recommended:
    return Recommended("tiny", "Tiny", REPO, FILE, "sd1", ("dia",), 1, sha256=sha)


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_download_with_progress_lands_verified_and_is_listed(hub, tmp_path):
    data = tiny_checkpoint()
    hub.files[(REPO, FILE)] = data
    events = []
    path = download(entry(), tmp_path, lambda s, d, t: events.append((s, d, t)), endpoint=hub.url)
    assert path == tmp_path / FILE and path.read_bytes() == data
    assert listing(tmp_path) == [FILE]  # no staging folder left behind
    downloading = [(d, t) for s, d, t in events if s == "downloading"]
    assert len(downloading) >= 5 and downloading[-1] == (len(data), len(data))
    assert [d for d, _ in downloading] == sorted(d for d, _ in downloading)
    assert events[-1] == ("done", len(data), len(data)) and any(s == "verifying" for s, _, _ in events)
    [found] = discovery.scan([tmp_path], ["dia"], include_usual=False)
    assert (found.id, found.family, found.methods) == (str(path), "sd1", ["dia"])
    # again: already there, nothing fetched
    n = len(hub.requests)
    assert download(entry(), tmp_path, endpoint=hub.url) == path and len(hub.requests) == n


def test_an_interrupted_download_resumes_where_it_stopped(hub, tmp_path):
    data = tiny_checkpoint(2_000_000)
    hub.files[(REPO, FILE)] = data
    cancel = threading.Event()

    def stop_half_way(stage, done, total):
        if stage == "downloading" and done >= len(data) // 2:
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download(entry(), tmp_path, stop_half_way, cancel, endpoint=hub.url)
    part = tmp_path / STAGING / (FILE + ".part")
    kept = part.stat().st_size
    # the chunk being counted when the cancel came is not written: at most one chunk less
    assert len(data) // 2 - 64 * 1024 <= kept < len(data) and part.read_bytes() == data[:kept]
    assert not (tmp_path / FILE).exists()  # nothing half-written among the models
    hub.requests.clear()
    path = download(entry(), tmp_path, endpoint=hub.url)
    assert path.read_bytes() == data
    ranges = [r for m, _, r in hub.requests if m == "GET"]
    assert ranges == [f"bytes={kept}-"]  # only the rest was asked for


def test_a_dropped_connection_is_resumed_by_the_hub_client(hub, tmp_path):
    data = tiny_checkpoint(1_000_000)
    hub.files[(REPO, FILE)] = data
    hub.fail_after = 300_000
    path = download(entry(), tmp_path, endpoint=hub.url)
    assert path.read_bytes() == data
    gets = [r for m, _, r in hub.requests if m == "GET"]
    assert gets[0] is None and gets[-1] is not None and gets[-1].startswith("bytes=")


def test_a_checksum_mismatch_is_refused_and_nothing_is_left(hub, tmp_path):
    data = tiny_checkpoint()
    hub.files[(REPO, FILE)] = data
    hub.claimed_sha[(REPO, FILE)] = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(AnalogonError) as e:
        download(entry(), tmp_path, endpoint=hub.url)
    assert e.value.code == "checksum_mismatch"
    assert listing(tmp_path) in ([], [STAGING])
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    # a pinned SHA-256 in the catalog wins over the hub's
    hub.claimed_sha.clear()
    hub.requests.clear()
    with pytest.raises(AnalogonError) as e:
        download(entry(sha="0" * 64), tmp_path, endpoint=hub.url)
    assert e.value.code == "checksum_mismatch" and not (tmp_path / FILE).exists()
    # the hub says which file it serves: refused before any byte is fetched
    assert "not the file the publisher released" in e.value.message
    assert not [r for r in hub.requests if r[0] == "GET"]
    assert download(entry(sha=hashlib.sha256(data).hexdigest()), tmp_path, endpoint=hub.url).read_bytes() == data


def test_unknown_file_or_unreachable_hub_is_a_clear_error(hub, tmp_path):
    with pytest.raises(AnalogonError) as e:
        download(entry(), tmp_path, endpoint=hub.url)
    assert e.value.code == "download_failed" and REPO in e.value.message
    assert not (tmp_path / FILE).exists()


def test_the_server_downloads_with_progress_and_cancel(hub, tmp_path, monkeypatch):
    from analogon.models import download as dl
    from analogon.server import ServerThread, Settings

    data = tiny_checkpoint(3_000_000)
    hub.files[(REPO, FILE)] = data
    monkeypatch.setattr(dl, "CATALOG", (entry(),))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    models = tmp_path / "models"
    monkeypatch.setenv("ANALOGON_MODELS_DIR", str(models))
    settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu", scan_usual_places=True)
    with ServerThread(settings) as srv, httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=30) as c:
        cat = c.get("/v1/downloads/catalog").json()
        assert [m["id"] for m in cat["models"]] == ["tiny"] and cat["models_dir"] == str(models)
        assert cat["models"][0]["installed"] is False
        job = c.post("/v1/downloads", json={"model": "tiny"}).json()
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = c.get(f"/v1/downloads/{job['id']}").json()
            seen.append(st)
            if st["status"] in ("done", "error", "cancelled"):
                break
            time.sleep(0.02)
        assert seen[-1]["status"] == "done", seen[-1]
        assert seen[-1]["bytes"] == seen[-1]["total"] == len(data)
        assert (models / FILE).read_bytes() == data
        assert c.get("/v1/downloads/catalog").json()["models"][0]["installed"] is True
        listed = {m["id"]: m for m in c.get("/v1/models", params={"wait": 10}).json()["models"]}
        assert listed[str(models / FILE)]["location"] == "Analogon models"
        assert c.post("/v1/downloads", json={"model": "nope"}).status_code == 404
        assert c.get("/v1/downloads/nope").status_code == 404
        # cancel: a slow second download stops, and leaves only its partial file for later
        os.remove(models / FILE)
        hub.chunk_delay = 0.05
        job = c.post("/v1/downloads", json={"model": "tiny"}).json()
        deadline = time.monotonic() + 60
        while c.get(f"/v1/downloads/{job['id']}").json()["bytes"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.delete(f"/v1/downloads/{job['id']}").json()["id"] == job["id"]
        while (st := c.get(f"/v1/downloads/{job['id']}").json())["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert st["status"] == "cancelled" and 0 < st["bytes"] < len(data)
        assert not (models / FILE).exists() and (models / STAGING / (FILE + ".part")).exists()


def test_analogon_download_command(hub, tmp_path, monkeypatch, capsys):
    from analogon import cli
    from analogon.models import download as dl

    data = tiny_checkpoint()
    hub.files[(REPO, FILE)] = data
    monkeypatch.setattr(dl, "CATALOG", (entry(),))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert cli.main(["download", "--list", "--to", str(tmp_path)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli.main(["download", "tiny", "--to", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / FILE) and "done" in out.err
    assert (tmp_path / FILE).read_bytes() == data
    assert cli.main(["download", "nope", "--to", str(tmp_path)]) == 1


# -- downloads that survive cancels, other processes and full disks (issue 28) ---------------------

def _until(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_cancel_then_start_starts_a_new_download(hub, tmp_path, monkeypatch):
    """Item 4: starting again right after a cancel returned the dying download, which ended
    cancelled: the restart was lost. Now it is a new download, which resumes the partial file."""
    data = tiny_checkpoint(2_000_000)
    hub.files[(REPO, FILE)] = data
    hub.chunk_delay = 0.02
    monkeypatch.setattr(dl, "CATALOG", (entry(),))
    downloads = Downloads(tmp_path, endpoint=hub.url)
    first = downloads.start("tiny")
    _until(lambda: first.bytes > 0, what="the first bytes")
    downloads.cancel(first.id)
    second = downloads.start("tiny")
    assert second.id != first.id and second.status in ("queued", "running")
    assert downloads.start("tiny") is second  # while it runs, starting again is the same download
    _until(lambda: second.status not in ("queued", "running"), what="the second download")
    assert (first.status, second.status) == ("cancelled", "done"), second.error
    assert (tmp_path / FILE).read_bytes() == data
    gets = [r for m, _, r in hub.requests if m == "GET"]
    assert len(gets) == 2 and gets[1] is not None  # the second went on from the first one's part


def test_two_processes_never_write_the_same_part(hub, tmp_path):
    """Item 4: two backends sharing a models folder wrote the same .part and both failed. Now
    the second waits for the first one's lock, then finds the file there."""
    data = tiny_checkpoint(1_000_000)
    hub.files[(REPO, FILE)] = data
    hub.pause_at = len(data) // 2
    script = ("import sys; import huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 64 * 1024; "
              "from analogon.models.download import Recommended, download; "
              f"e = Recommended('tiny', 'Tiny', {REPO!r}, {FILE!r}, 'sd1', ('dia',), 1); "
              "print(download(e, sys.argv[1], endpoint=sys.argv[2]))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    other = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), hub.url], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        part = tmp_path / STAGING / (FILE + ".part")
        # it holds at the hub's pause, with all but the chunk being read written
        _until(lambda: part.exists() and part.stat().st_size >= len(data) // 2 - 64 * 1024,
               what="the other process")
        stages, got = [], []
        mine = threading.Thread(target=lambda: got.append(download(
            entry(), tmp_path, lambda s, d, t: stages.append(s), endpoint=hub.url)), daemon=True)
        mine.start()
        _until(lambda: "waiting" in stages, what="this process to wait")
        assert len([m for m, _, _ in hub.requests if m == "GET"]) == 1  # only the other one fetches
        hub.resume.set()
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0, err
        mine.join(60)
    finally:
        hub.resume.set()
        if other.poll() is None:
            other.kill()
    assert got == [tmp_path / FILE] and (tmp_path / FILE).read_bytes() == data
    assert stages[-1] == "done" and "downloading" not in stages
    assert len([m for m, _, _ in hub.requests if m == "GET"]) == 1
    assert listing(tmp_path) == [FILE]  # no lock file, no staging folder left


def test_the_free_space_is_checked_before_writing(hub, tmp_path, monkeypatch):
    """Item 4: no free-space check although the size is known. Now a clear message first."""
    data = tiny_checkpoint()
    hub.files[(REPO, FILE)] = data
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 500, 500))
    with pytest.raises(AnalogonError) as e:
        download(entry(), tmp_path, endpoint=hub.url)
    assert e.value.code == "not_enough_space"
    assert re.search(r"needs 6\d\d\.\d kB, 500 B free", e.value.message), e.value.message
    assert e.value.detail == {"needed_bytes": len(data), "free_bytes": 500}
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing was written
    assert [m for m, _, _ in hub.requests] == ["HEAD"]


def test_a_part_the_disk_will_not_grow_is_removed(hub, tmp_path, monkeypatch):
    """Item 4: a full disk left the partial file filling it, while the message said "starting it
    again resumes it". Now the partial file is removed and the message says why."""
    data = tiny_checkpoint(1_000_000)
    hub.files[(REPO, FILE)] = data

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, chunk):
            if self.f.tell() + len(chunk) > 300_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(chunk)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(dl, "open", lambda path, mode="r", *a: FullDisk(open(path, mode, *a)) if mode == "ab"
                        else open(path, mode, *a), raising=False)
    with pytest.raises(AnalogonError) as e:
        download(entry(), tmp_path, endpoint=hub.url)
    assert e.value.code == "disk_full" and "filled up" in e.value.message
    assert "removed" in e.value.message and "resumes" not in e.value.message
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_finished_downloads_expire(hub, tmp_path, monkeypatch):
    """Item 4: the download table only grew. Now a finished download is kept a while, and only
    so many of them."""
    hub.files[(REPO, FILE)] = tiny_checkpoint()
    monkeypatch.setattr(dl, "CATALOG", (entry(),))
    downloads = Downloads(tmp_path, endpoint=hub.url, keep_finished_s=0.5, keep_finished=2)
    jobs = []
    for _ in range(3):  # the first downloads, the next two find the file there
        jobs.append(downloads.start("tiny"))
        _until(lambda: jobs[-1].status == "done", what="a download")
    with pytest.raises(AnalogonError) as e:
        downloads.get(jobs[0].id)  # beyond the count
    assert e.value.code == "download_not_found"
    assert downloads.get(jobs[2].id).status == "done"
    time.sleep(0.6)
    for job in jobs[1:]:  # past their time
        with pytest.raises(AnalogonError):
            downloads.get(job.id)


def test_every_recommended_model_pins_the_publishers_sha256():
    for e in dl.catalog():
        assert dl.SHA256_RE.match(e.sha256 or ""), e.id
    assert len({e.sha256 for e in dl.catalog()}) == len(dl.catalog())


def test_verify_compares_a_file_with_the_pinned_sha256(tmp_path):
    data = tiny_checkpoint(100_000)
    f = tmp_path / FILE
    f.write_bytes(data)
    good = dl.verify(entry(sha=hashlib.sha256(data).hexdigest()), f)
    assert good["ok"] is True and good["sha256"] == good["expected"] and good["size_bytes"] == len(data)
    bad = dl.verify(entry(sha="0" * 64), f)
    assert bad["ok"] is False and bad["sha256"] == hashlib.sha256(data).hexdigest()
    with pytest.raises(AnalogonError) as e:
        dl.verify(entry(), f)
    assert e.value.code == "no_checksum"
    with pytest.raises(AnalogonError) as e:
        dl.verify(entry(sha="0" * 64), tmp_path / "missing.safetensors")
    assert e.value.code == "model_not_found"


def test_the_catalog_tells_what_is_on_disk_and_verifies_it(tmp_path, monkeypatch):
    from analogon.server import ServerThread, Settings

    data = tiny_checkpoint(200_000)
    models = tmp_path / "models"
    models.mkdir()
    (models / FILE).write_bytes(data)
    other = tmp_path / "elsewhere" / "mine.safetensors"
    other.parent.mkdir()
    other.write_bytes(tiny_checkpoint(300_000))
    pinned = Recommended("tiny", "Tiny", REPO, FILE, "sd1", ("dia",), len(data),
                         sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(dl, "CATALOG", (pinned,))
    monkeypatch.setenv("ANALOGON_MODELS_DIR", str(models))
    settings = Settings(port=0, state_dir=tmp_path / "state", cache_dir="", device="cpu",
                        scan_usual_places=True, model_dirs=[other.parent])
    with ServerThread(settings) as srv, httpx.Client(
            base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=30) as c:
        c.get("/v1/models", params={"wait": 10})
        cat = c.get("/v1/downloads/catalog").json()["models"][0]
        found = {Path(d["id"]).name: d for d in cat["on_disk"]}
        assert set(found) == {FILE, "mine.safetensors"}
        assert found[FILE]["same_file"] is True and found["mine.safetensors"]["same_file"] is False
        v = c.post("/v1/downloads/verify", json={"model": "tiny"}).json()
        assert v["ok"] is True and v["sha256"] == pinned.sha256
        v = c.post("/v1/downloads/verify", json={"model": "tiny", "path": str(other)}).json()
        assert v["ok"] is False
        r = c.post("/v1/downloads/verify", json={"model": "tiny", "path": "/etc/passwd"})
        assert r.status_code == 404 and r.json()["code"] == "model_not_found"
        assert c.post("/v1/downloads/verify", json={"model": "nope"}).status_code == 404


def test_a_catalogue_file_replaces_the_recommended_models(tmp_path, monkeypatch):
    import json

    rows = [{"id": "house", "title": "House model", "repo_id": "studio/house", "filename": "house.safetensors",
             "family": "sd1", "methods": ["dia"], "size_bytes": 10, "sha256": "ab" * 32}]
    (tmp_path / "catalog.json").write_text(json.dumps(rows))
    monkeypatch.setenv(dl.CATALOG_ENV, str(tmp_path / "catalog.json"))
    assert [e.id for e in dl.catalog()] == ["house"] and dl.find("house").methods == ("dia",)
    with pytest.raises(AnalogonError) as e:
        dl.find("sd15")
    assert e.value.code == "unknown_download" and "house" in e.value.message
    (tmp_path / "catalog.json").write_text("[{")
    with pytest.raises(AnalogonError) as e:
        dl.catalog()
    assert e.value.code == "bad_catalog" and "ANALOGON_CATALOG" in e.value.message

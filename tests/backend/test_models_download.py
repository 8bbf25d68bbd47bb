"""Getting a model from a stand-in hub on 127.0.0.1 (huggingface_hub with endpoint= pointing
at it): progress, resume after an interrupted download, a SHA-256 mismatch refused, cancel,
nothing half-written in the models folder, and the server's /v1/downloads."""
from __future__ import annotations

import hashlib
import os
import threading
import time

import httpx
import numpy as np
import pytest

from analogon.errors import AnalogonError
from analogon.models import discovery
from analogon.models.download import STAGING, DownloadCancelled, Recommended, download
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
    with pytest.raises(AnalogonError) as e:
        download(entry(sha="0" * 64), tmp_path, endpoint=hub.url)
    assert e.value.code == "checksum_mismatch" and not (tmp_path / FILE).exists()
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
        listed = {m["id"]: m for m in c.get("/v1/models").json()["models"]}
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

"""The docker and a backend on another machine (issue 31), against a real ``analogon serve
--tls`` on 127.0.0.1 with the self-signed certificate it makes: the fingerprint shown and
pinned on first contact (trust on first use), a second contact that connects without asking,
a changed certificate refused with both fingerprints named (and trusted again after Forget), the
painter's token used, no local backend ever started or installed, and how images travel
(the upload format measured per image, its progress)."""
from __future__ import annotations

import zlib

import pytest
from conftest import wait_until

import tls_backend
from analogon_krita.controller import Controller
from analogon_krita.document.document import Rect
from analogon_krita.install.installer import Installer
from analogon_krita.link import backend_process as bp
from analogon_krita.link import remote
from analogon_krita.link.client import Client, ImagePayload, raw_image_id
from analogon_krita.settings import Settings
from analogon_krita.ui import lead
from analogon_krita.ui.panel import AnalogonPanel

GROUP = "analogon"


@pytest.fixture(scope="module")
def port():
    return tls_backend.free_port()


@pytest.fixture(scope="module")
def server(tmp_path_factory, port):
    """The studio's backend, with a painter (alice)."""
    reason = tls_backend.unavailable()
    if reason:
        pytest.skip(reason)
    srv = tls_backend.TlsBackend(tmp_path_factory.mktemp("tls") / "a", port)
    srv.alice = srv.painter("alice")
    yield srv
    srv.stop()


@pytest.fixture
def no_local_start(monkeypatch):
    """Every attempt to start a local backend, recorded (and none made)."""
    calls = []
    monkeypatch.setattr(bp.BackendProcess, "start", lambda self, *a, **kw: calls.append(a))
    return calls


def remote_settings(kapp, url, token, pin: str | None = None):
    kapp.writeSetting(GROUP, "connection", "remote")
    kapp.writeSetting(GROUP, "remote_url", url)
    kapp.writeSetting(GROUP, "remote_token", token)
    kapp.writeSetting(GROUP, "autostart", "true")  # never honoured for a remote backend
    if pin is not None:
        remote.pin(Settings(kapp), url, pin)


def connect(c, timeout=30):
    done = []
    c.connect_backend(done.append)
    assert wait_until(lambda: done, timeout), "no answer"
    return done[0]


class Asked:
    """TrustPrompt.ask as the painter answers it."""

    def __init__(self, answer: bool):
        self.answer = answer
        self.texts = []

    def __call__(self, title, text):
        self.texts.append(text)
        return self.answer


def test_first_contact_shows_the_fingerprint_and_pins_it_a_second_contact_does_not_ask(
        kapp, server, port, tmp_path, no_local_start):
    remote_settings(kapp, server.url, server.alice)
    c = Controller(app=kapp)
    panel = AnalogonPanel(c, installer=Installer(venv=tmp_path / "venv", wheel=None))
    panel.trust.ask = asked = Asked(False)  # the painter first says no
    assert connect(c) is False
    assert c.link.reason == "certificate_unknown"
    assert c.link.certificate["fingerprint"] == server.fingerprint
    assert wait_until(lambda: asked.texts, 5), "the docker did not ask"
    assert len(asked.texts) == 1 and server.fingerprint in asked.texts[0] and server.url in asked.texts[0]
    assert remote.pins(c.settings) == {}  # refused: nothing pinned
    # the lead names the fingerprint and offers to trust it (and never an install or a start)
    assert server.fingerprint in panel.status_label.text() and "self-signed" in panel.status_label.text()
    assert panel.start_button.text() == "Trust certificate\u2026" and not panel.start_button.isHidden()
    c.link._on_health_tick()  # the monitor connects again: the same question is not asked twice
    assert wait_until(lambda: not c.link.connecting, 10)
    wait_until(lambda: False, 0.2)
    assert len(asked.texts) == 1
    asked.answer = True
    panel.start_button.click()  # Trust certificate…
    assert wait_until(lambda: c.connected, 30), c.connection_message
    assert len(asked.texts) == 2
    assert remote.pins(c.settings) == {f"https://127.0.0.1:{port}": server.fingerprint}
    # the painter's token: the backend knows who connected
    assert c.health["painter"]["name"] == "alice" and c.health["tls"]["fingerprint_sha256"] == server.fingerprint
    assert c.connection_message.startswith(f"Connected to {server.url} as alice")
    assert panel.start_button.isHidden()  # connected: the lead folds away, no action
    panel.deleteLater()
    c.deleteLater()

    # a second contact (a new client: a new TLS handshake) with the same certificate: no question
    c2 = Controller(app=kapp)
    prompt = remote.TrustPrompt(c2.link)
    prompt.ask = asked2 = Asked(True)
    assert connect(c2) is True, c2.connection_message
    wait_until(lambda: False, 0.2)
    assert asked2.texts == [] and c2.health["painter"]["name"] == "alice"
    c2.deleteLater()
    assert no_local_start == []


def painted_doc(kapp):
    doc = kapp.createDocument(64, 64, "t", "RGBA", "U8", "", 72.0)
    kapp.setActiveDocument(doc)
    bg = doc.createNode("Background", "paintlayer")
    doc.rootNode().addChildNode(bg, None)
    bg.setPixelData(bytes((255, 255, 255, 255)) * 4096, 0, 0, 64, 64)
    photo = doc.createNode("photo", "paintlayer")
    doc.rootNode().addChildNode(photo, bg)
    photo.setPixelData(bytes((40, 120, 200, 255)) * 4096, 0, 0, 64, 64)
    ex = doc.createNode("ex", "paintlayer")
    doc.rootNode().addChildNode(ex, photo)
    r = Rect(8, 8, 16, 16)
    ex.setPixelData(bytes((0, 0, 255, 255)) * (r.w * r.h), r.x, r.y, r.w, r.h)
    doc.setActiveNode(photo)
    return doc, photo, ex


def test_a_pass_on_the_remote_backend_with_the_painters_token(kapp, server, no_local_start):
    """Generate through the pinned TLS connection: the images go in the measured format, the
    job is alice's on the server, and the result layer appears."""
    from analogon_krita.document import document as kd

    remote_settings(kapp, server.url, server.alice, pin=server.fingerprint)
    c = Controller(app=kapp)
    c.start_monitoring()  # autostart is on: a remote backend is connected to, never started
    assert wait_until(lambda: c.connected, 30), c.connection_message
    c.set_model("tiny-sd")
    c.set_method("pixels")
    c.set_seed(7, False)
    c.set_param("steps", 3)
    c.set_param("strength", 0.6)
    doc, photo, ex = painted_doc(kapp)
    c.set_document(doc)
    c.set_role("exemplar", [kd.layer_id(ex)])
    emap = c.new_edit_map()
    emap.setPixelData(bytes([255, 255]) * 256, 8, 8, 16, 16)
    passes = c.prepare()
    formats = {p.format for p in passes[0].spec.payloads()}
    for p in passes[0].spec.payloads():  # each image as the smallest of the three encodings
        assert p.measured and len(p.body) == min(p.measured.values()) and p.format != "rgba"
    assert formats <= {"deflate", "png"}
    ends, stages = [], []
    c.finished.connect(ends.append)
    c.progressChanged.connect(lambda s, a, b: stages.append((s, a, b)))
    assert c.generate()
    assert wait_until(lambda: ends, 180), "the pass did not finish"
    assert ends == ["done"], c.error
    names = [n.name() for n in doc.rootNode().childNodes()]
    assert "pixels seed 7" in names
    node = doc.nodeByName("pixels seed 7")
    assert node.bounds().width() > 0
    uploads = [s for s in stages if s[0].startswith("uploading image ")]
    assert uploads and uploads[-1][1] == uploads[-1][2] and uploads[-1][0].endswith(" kB")
    assert [u[0].split(":")[0] for u in uploads][-1] == f"uploading image {len(passes[0].spec.payloads())} " \
        f"of {len(passes[0].spec.payloads())}"
    # the server's owner sees the job as alice's
    status, jobs = server.get("/v1/jobs", server.token)
    assert status == 200
    assert [j["owner"] for j in jobs["jobs"] if j["status"] == "done"][-1:] == ["alice"]
    status, own = server.get("/v1/jobs", server.alice)
    assert status == 200 and own["jobs"] and all(j["owner"] == "alice" for j in own["jobs"])
    c.deleteLater()
    assert no_local_start == []


def test_a_wrong_or_revoked_token_names_the_connection_settings(kapp, server):
    remote_settings(kapp, server.url, "not-a-token", pin=server.fingerprint)
    c = Controller(app=kapp)
    assert connect(c) is False
    assert "\u2699 \u25b8 Connection" in c.connection_message
    assert "analogon tokens create" in c.connection_message
    bob = server.painter("bob")
    server.tokens("revoke", "bob")
    kapp.writeSetting(GROUP, "remote_token", bob)
    assert connect(c) is False
    assert "revoked" in c.connection_message and "\u2699 \u25b8 Connection" in c.connection_message
    got = lead.decide(lead.facts(c.link))
    assert got.tone == "problem" and got.action == "" and got.text == c.connection_message
    c.deleteLater()


def test_the_upload_format_is_chosen_by_measured_size_and_the_server_stores_the_pixels(kapp, server):
    """Raw for noise, compressed raw for a small flat map, PNG for a smooth picture: the
    smallest each time, and every one stored as its pixels (downloaded raw, byte for byte)."""
    import random

    rnd = random.Random(4)
    w = h = 128
    noise = bytes(rnd.randrange(256) for _ in range(w * h * 4))
    smooth = bytes(v for y in range(h) for x in range(w) for v in (x * 2, y * 2, x + y, 255))
    flat = bytes((30, 60, 90, 255)) * (16 * 16)
    c = Client(server.url, server.alice, pinned=lambda: server.fingerprint, remote=True)
    for rgba, pw, ph, expected in ((noise, w, h, "rgba"), (flat, 16, 16, "deflate"), (smooth, w, h, "png")):
        p = ImagePayload.from_rgba(rgba, pw, ph, "auto")
        assert p.format == expected, p.measured
        assert set(p.measured) == {"rgba", "deflate", "png"} and len(p.body) == min(p.measured.values())
        if p.format == "deflate":
            assert p.sha == raw_image_id(rgba, pw, ph) and zlib.decompress(p.body) == rgba
            assert p.headers()["Content-Encoding"] == "deflate"
        box, progress = [], []
        call = c.put_image(p, box.append)
        call.reply.uploadProgress.connect(lambda a, b: progress.append((a, b)))
        assert wait_until(lambda: box, 30) and box[0].ok, box[0].error
        assert (len(p.body), len(p.body)) in progress  # (Qt adds (0, 0) when the reply ends)
        got = []
        c.get_image_rgba(p.sha, got.append)
        assert wait_until(lambda: got, 30) and got[0].ok
        assert got[0].body == rgba
    c.deleteLater()


def test_the_upload_format_setting(kapp):
    s = Settings(kapp)
    assert remote.upload_format(s) == "rgba"  # auto, on this computer: raw
    s.set("connection", "remote")
    assert remote.upload_format(s) == "auto"
    s.set("image_format", "rgba")  # the earlier setting, as every saved dialog wrote it: still auto
    assert remote.upload_format(s) == "auto"
    s.set("image_format", "png")  # a painter who chose PNG keeps it
    assert remote.upload_format(s) == "png"
    for fmt in ("rgba", "deflate", "png", "auto"):
        s.set("upload_format", fmt)
        assert remote.upload_format(s) == fmt
    s.set("connection", "local")
    assert remote.upload_format(s) == "rgba"  # auto here: raw
    s.set("upload_format", "png")
    assert remote.upload_format(s) == "png"


def test_remote_mode_never_starts_or_installs_a_local_backend(kapp, tmp_path, no_local_start):
    port = tls_backend.free_port()  # nobody listens there
    remote_settings(kapp, f"https://127.0.0.1:{port}", "t")
    kapp.writeSetting(GROUP, "backend_command", "/bin/true")  # something a local start would run
    c = Controller(app=kapp)
    wheel = tmp_path / "analogon-0.1.0-py3-none-any.whl"  # a plugin that could install a backend
    wheel.write_bytes(b"")
    panel = AnalogonPanel(c, installer=Installer(venv=tmp_path / "venv", wheel=wheel))
    c.start_monitoring()
    c.start_backend()
    assert wait_until(lambda: c.connection == "unreachable" and not c.link.connecting, 20)
    got = lead.decide(lead.facts(c.link, panel.installer))
    assert got.action not in (lead.INSTALL, lead.START, lead.STOP) and got.button == ""
    assert "\u2699 \u25b8 Connection" in got.text and f"127.0.0.1:{port}" in got.text
    ends = []
    c.finished.connect(ends.append)
    c.generate()
    assert wait_until(lambda: ends, 20) and ends == ["error"]
    assert c.error.startswith("Cannot generate: ") and "Install" not in c.error and "Start backend" not in c.error
    panel._on_installed(True, "")  # an install that ends does not start a local backend either
    assert wait_until(lambda: not c.link.connecting, 20)
    assert no_local_start == [] and c.process.state == "stopped" and c.process.pid is None
    # an empty address says where to enter it
    kapp.writeSetting(GROUP, "remote_url", "")
    assert connect(c) is False and "Enter the address" in c.connection_message
    panel.deleteLater()
    c.deleteLater()


def test_the_connection_tab_saves_the_remote_backend_and_forgets_its_certificate(kapp, tmp_path):
    from analogon_krita.ui.backend_setup import BackendSetup

    c = Controller(app=kapp)
    remote.pin(c.settings, "https://gpu-box:7871", "AA:BB")
    setup = BackendSetup(c, Installer(venv=tmp_path / "venv"))
    page = setup.connection
    assert page.local_choice.isChecked() and not page.remote_box.isEnabled() and setup.isTabEnabled(2)
    page.remote_choice.setChecked(True)
    assert page.remote_box.isEnabled() and not setup.isTabEnabled(2)  # Memory: for a local backend
    page.url.setText(" gpu-box:7871/ ")
    assert "AA:BB" in page.certificate.text() and page.forget_button.isEnabled()
    page.token.setText(" secret ")
    setup.save()
    assert (c.settings.get("connection"), c.settings.get("remote_url"), c.settings.get("remote_token")) == (
        "remote", "https://gpu-box:7871", "secret")
    page.forget_button.click()
    assert remote.pins(c.settings) == {} and not page.forget_button.isEnabled()
    page.url.setText("http://10.0.0.5:7871")
    assert "in clear" in page.certificate.text()
    page.url.setText("http://127.0.0.1:7872")
    assert "SSH tunnel" in page.certificate.text()
    setup.deleteLater()
    c.deleteLater()


def test_fingerprints_and_addresses():
    assert remote.format_fingerprint(bytes(range(32))).startswith("00:01:02:03")
    assert remote.origin("HTTPS://Gpu-Box:7871/") == "https://gpu-box:7871"
    assert remote.origin("gpu-box") == "https://gpu-box:443"
    assert remote.origin("http://[::1]:7872") == "http://[::1]:7872"
    assert remote.is_loopback("http://127.0.0.1:7872") and not remote.is_loopback("https://gpu-box:7871")


def test_a_changed_certificate_is_refused_naming_both_fingerprints(kapp, server, port, tmp_path_factory,
                                                                    no_local_start):
    """The backend comes back on the same address with a new certificate (its state folder
    is another): nothing is sent, the message names both fingerprints and what to do; Forget,
    then trusting the new one, connects. (Last in this module: it stops ``server``.)"""
    old = server.fingerprint
    server.stop()
    with tls_backend.TlsBackend(tmp_path_factory.mktemp("tls") / "b", port) as new:
        assert new.fingerprint != old and new.url == server.url
        remote_settings(kapp, new.url, new.painter("alice"), pin=old)
        c = Controller(app=kapp)
        prompt = remote.TrustPrompt(c.link)
        prompt.ask = asked = Asked(True)
        assert connect(c) is False
        assert c.link.reason == "certificate_changed"
        msg = c.connection_message
        assert old in msg and new.fingerprint in msg and "nothing was sent" in msg and "Forget" in msg
        got = lead.decide(lead.facts(c.link))
        assert (got.action, got.button) == (lead.FORGET, "Forget the old certificate")
        wait_until(lambda: False, 0.2)
        assert asked.texts == [] and remote.pinned(c.settings, new.url) == old  # not asked, not replaced
        prompt.forget()  # the lead's button: forget, connect again, and ask about the new one
        assert wait_until(lambda: c.connected, 30), c.connection_message
        assert len(asked.texts) == 1 and new.fingerprint in asked.texts[0]
        assert remote.pinned(c.settings, new.url) == new.fingerprint
        c.deleteLater()
    assert no_local_start == []

"""Real Krita (5 on this machine, 6 in its Debian sid root: see kritas.py) under Xvfb with the
plugin installed and enabled in a private profile: the docker appears, starts the backend
(autostart), shows the methods and their forms, and the backend stops when Krita quits. A
screenshot of the whole screen and a grab of the docker are kept (set ANALOGON_SCREENSHOT_DIR
to copy them, as ``krita5-*.png`` and ``krita6-*.png``, somewhere to look at)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kritas

pytestmark = pytest.mark.krita

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
XVFB = shutil.which("Xvfb")
XWD = shutil.which("xwd")  # the screenshot: x11-apps' xwd piped into ImageMagick's convert


def _load_packaging():
    spec = importlib.util.spec_from_file_location("krita_plugin", ROOT / "packaging" / "krita_plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


def _start_xvfb():
    """Xvfb on the first free display; returns (process, display number) once it accepts
    connections (it writes the number to ``-displayfd`` only then). ``-noreset``: Krita
    connects more than once while it starts, and a connection that arrives while the server
    resets after the previous client left is refused ("could not connect to display")."""
    r, w = os.pipe()
    try:
        xvfb = subprocess.Popen([XVFB, "-displayfd", str(w), "-screen", "0", "1600x1000x24",
                                 "-nolisten", "tcp", "-noreset"], pass_fds=(w,),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        w = None
        with os.fdopen(r, "rb") as f:
            r = None
            number = f.readline().strip()  # empty when Xvfb exits without a display
    finally:
        for fd in (r, w):
            if fd is not None:
                os.close(fd)
    if not number.isdigit():
        xvfb.kill()
        xvfb.wait(10)
        raise RuntimeError("Xvfb did not start")
    return xvfb, int(number)


def _fit_previews_ahead(cache_dir: Path) -> None:
    """Put the latent-preview fits of the models the docker may choose (toy-sd, its demo
    model, and tiny-sd) in the backend's cache folder, as an earlier session would have: the
    backend then reads them when a model loads instead of fitting in the background, and the
    DIA sweep's previews do not depend on how busy the machine is (a job that starts before
    the fit sends none, by design)."""
    from analogon.core import previews
    from analogon.core.cache import Cache
    from analogon.models import LoadOptions, load_bundle

    for spec in ("toy-sd", "tiny-sd"):
        previews.previewer(load_bundle(spec, LoadOptions(device="cpu")), Cache(cache_dir))


@pytest.mark.skipif(XVFB is None or XWD is None, reason="Xvfb and xwd (x11-apps) are not installed")
@pytest.mark.parametrize("which", kritas.KRITAS)
def test_docker_shows_in_real_krita(which, tmp_path):
    krita_host = kritas.get(which)
    reason = krita_host.unavailable("krita")
    if reason:
        pytest.skip(reason)
    analogon = Path(sys.executable).parent / "analogon"
    if not analogon.exists():
        pytest.skip("the analogon backend command is not installed")
    data, config, state, home = (tmp_path / d for d in ("data", "config", "state", "home"))
    runtime, tmp = tmp_path / "runtime", tmp_path / "tmp"
    for d in (data, config, state, home, runtime, tmp):
        d.mkdir()
    runtime.chmod(0o700)
    pk = _load_packaging()
    pk.install(resources=data / "krita", config=config)
    shutil.copytree(HERE / "selftest" / "analogon_selftest", data / "krita" / "pykrita" / "analogon_selftest")
    shutil.copy2(HERE / "selftest" / "analogon_selftest.desktop", data / "krita" / "pykrita")
    pk.enable_in_kritarc(config / "kritarc", "analogon_selftest")
    report = tmp_path / "report.json"
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    _fit_previews_ahead(tmp_path / "cache" / "analogon")
    xvfb, display = _start_xvfb()
    env = {"QT_QPA_PLATFORM": None, "ANALOGON_QT_API": None, "ANALOGON_NO_REGISTER": None,
           "DISPLAY": f":{display}", "HOME": str(home), "XDG_DATA_HOME": str(data),
           "XDG_CONFIG_HOME": str(config), "XDG_STATE_HOME": str(state),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_RUNTIME_DIR": str(runtime),
           "TMPDIR": str(tmp), "ANALOGON_SELFTEST_REPORT": str(report), **offline}
    krita = None
    rep = {}
    try:
        with krita_host.session(tmp_path):
            private = {k: v for k, v in env.items() if k.startswith("XDG_") or k in ("HOME", "TMPDIR")}
            backend = krita_host.backend_command(tmp_path, str(analogon), {**private, **offline})
            with open(config / "kritarc", "a") as f:
                f.write(f"\n[analogon]\nautostart=true\nbackend_command={backend}\nmodel=tiny-sd\n")
            argv, penv = krita_host.command(["krita", "--nosplash"], env)
            log = open(tmp_path / "krita.log", "wb")
            krita = subprocess.Popen(argv, env=penv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            deadline = time.monotonic() + 800  # start, connect, a DIA sweep, undo, a map pass, a cancel (a busy machine)
            while not report.exists() and time.monotonic() < deadline and krita.poll() is None:
                time.sleep(0.5)
            assert report.exists(), "Krita did not report: " + (tmp_path / "krita.log").read_text(errors="replace")[-3000:]
            rep = json.loads(report.read_text())
            time.sleep(1.0)  # let the window repaint after the docker settled
            shot = tmp_path / "screen.png"
            subprocess.run(f"xwd -root -display :{display} | convert xwd:- {shot}", shell=True, check=True,
                           timeout=60)
            keep = os.environ.get("ANALOGON_SCREENSHOT_DIR")
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copy2(shot, Path(keep) / f"{which}-screen.png")
                if (tmp_path / "docker.png").exists():
                    shutil.copy2(tmp_path / "docker.png", Path(keep) / f"{which}-docker.png")
            _keep_pictures(tmp_path)
            # Quit Krita the way a user does; the backend it started must go with it.
            Path(str(report) + ".quit").touch()
            try:
                krita.wait(40)
            except subprocess.TimeoutExpired:
                pass
            pid = rep.get("backend_pid")
            gone = not _alive(pid) or any(not _alive(pid) or time.sleep(0.5) for _ in range(20))
            assert rep.get("found"), rep
            assert rep["title"] == "Analogon" and rep["visible"]
            assert rep["geometry"][2] > 100 and rep["geometry"][3] > 100
            assert {"Generate", "Cancel", "New edit map"} <= set(rep["buttons"])
            assert rep["status"].startswith("Connected"), rep["status"]
            assert "PIXELS exemplar edit" in rep["methods"]
            assert "steps" in rep["params"]
            assert rep["binding"] == {"krita5": "PyQt5", "krita6": "PyQt6"}[which], rep
            assert rep["krita_version"].startswith(f"{krita_host.major}."), rep
            assert shot.stat().st_size > 10_000
            _check_panel_and_undo(rep)
            assert krita.poll() is not None, "Krita did not quit"
            assert pid and gone, "the backend started by the plugin outlived Krita"
    finally:
        if krita is not None and krita.poll() is None:
            os.killpg(krita.pid, signal.SIGTERM)
            try:
                krita.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(krita.pid, signal.SIGKILL)
                krita.wait(10)
        pid = rep.get("backend_pid")
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        xvfb.terminate()
        xvfb.wait(10)


PICTURES = ("docker-docked.png", "docker-floating.png", "window-docked.png")


def _keep_pictures(tmp_path):
    """With ANALOGON_DOCS_SCREENSHOTS=1 the pictures in docs/images are replaced by the ones
    this run took (docs/plugin.md shows them)."""
    if os.environ.get("ANALOGON_DOCS_SCREENSHOTS") != "1":
        return
    for name in PICTURES:
        if (tmp_path / name).exists():
            shutil.copy2(tmp_path / name, ROOT / "docs" / "images" / name)


def _check_panel_and_undo(rep):
    assert "traceback" not in rep, rep["traceback"]
    # a DIA sweep: a locked preview layer while it ran, which became the result group
    run = rep["sweep"]
    assert run["how"] == "done", run["error"]
    assert run["variants"] == 2 and run["result"]["type"] == "grouplayer"
    assert run["previews"] and all(p["layer"] and p["locked"] for p in run["previews"]), run["previews"]
    assert run["previews"][0]["id"] == run["result"]["id"]
    assert "Analogon preview" not in run["result"]["names"]
    # the docker where Krita docks it, and floating: Generate and the message in view, no
    # label cut off
    for where in ("docked", "floating"):
        m = rep[where]
        assert m["generate_inside"], (where, m)
        assert m["message_inside"], (where, m)
        assert m["clipped"] == [], (where, m["clipped"])
    assert not rep["docked"]["floating"] and rep["floating"]["floating"]
    # one Undo after the pass removes it (its preview left no step of its own); Redo brings it
    und = rep["undo"]
    assert und["action"]
    # every press landed (Krita drops one that comes while the image is busy: pressed again)
    assert set(und["presses"]) == {"pass_undo", "pass_redo", "pick_undo", "pick_redo", "again_undo",
                                   "again_undo_2", "again_redo", "again_redo_2"}
    assert all(und["presses"].values()), und["presses"]
    assert und["after_pass_undo"] == [n for n in run["result"]["names"] if not n.startswith("dia seed")]
    assert und["after_redo"]["back"] and und["after_redo"]["children"] == 1
    # a variant pick is undone by one Undo: the group shows the first variant again
    assert und["picked"] and und["after_pick"]["children"] == 2
    assert und["after_pick"]["pixel"] != und["before_pick_pixel"]
    assert und["after_undo"]["children"] == 1 and und["after_undo"]["pixel"] == und["before_pick_pixel"]
    assert und["after_pick_redo"] == 2
    # the panel follows Krita's Undo and Redo of the pick: the strip, the history, the group's name
    assert und["followed_undo"] == {"picked": 0, "name": und["first_name"], "entry": und["first_name"]}
    assert und["followed_redo"] == {"picked": 1, "name": und["after_pick"]["name"],
                                    "entry": und["after_pick"]["name"]}
    # a second pick is one step too: two Undos take both picks back, two Redos bring them
    assert und["picked_again"] and und["after_pick_again"] == 3
    assert und["again_pixel"] == und["before_pick_pixel"]  # the copied layer shows the first variant
    assert und["undone_picks"] == [2, 1] and und["undone_pixel"] == und["before_pick_pixel"]
    assert und["after_again_redo"] == 3
    _check_the_canvas(rep)


def test_the_docs_show_the_pictures_this_test_takes():
    text = (ROOT / "docs" / "plugin.md").read_text()
    for name in PICTURES[:2]:
        assert f"images/{name}" in text and (ROOT / "docs" / "images" / name).exists(), name


def _check_the_canvas(rep):
    """What the canvas showed around a PIXELS pass through an edit map, and a cancel."""
    assert "map" in rep, {k: rep.get(k) for k in ("status", "sweep", "undo")}
    m = rep["map"]
    assert m["how"] == "done", m
    assert m["dark_before"] > 50, m  # the black map darkens the photo on the canvas
    assert m["previews"] and all(p["layer"] for p in m["previews"]), m
    assert all(p["keep_moved"] == 0 for p in m["previews"]), m  # "keep" never moves
    assert all(p["dark_on_canvas"] > 50 for p in m["previews"]), m  # the map shows while it runs
    # after the pass the map is hidden and gone from the canvas and the projection at once
    assert not m["after"]["map_visible"] and m["after"]["dark_on_canvas"] == 0, m
    assert m["after"]["keep_equals_photo"], m
    # Krita's Undo of the pass brings the map back on the canvas; Redo hides it again
    assert m["presses"]["map_pass_undo"] and m["presses"]["map_pass_redo"], m
    assert m["after_undo"]["map_visible"] and m["after_undo"]["dark_on_canvas"] > 50, m
    assert not m["after_redo"]["map_visible"] and m["after_redo"]["dark_on_canvas"] == 0, m
    cancel = rep["cancel"]
    assert cancel["how"] == "cancelled", cancel
    assert cancel["names_after"] == cancel["names_before"], cancel
    # the undo stack as before (its Redo names the preview taken back: see docs/plugin.md)
    assert cancel["texts_after"][0] == cancel["texts_before"][0], cancel

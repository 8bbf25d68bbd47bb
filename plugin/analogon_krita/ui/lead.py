"""What the docker's connection area says and offers: the first thing a painter reads.

:func:`decide` turns the facts (the link's state, whether a backend is installed or set up,
whether this plugin carries one to install, an install in progress) into one :class:`Lead`:
a sentence that names the real cause and the next step, and the one action that takes it
(*Install backend*, *Start backend*, *Stop backend*). A painter with nothing installed is
offered the install, never a command to type; a painter who set a command or an address
(⚙ ▸ Advanced) is told about them. A painter who chose a backend on another machine (⚙ ▸
Connection, link/remote.py) is never offered an install or a start: only *Trust certificate…* on
first contact with a self-signed certificate, *Forget the old certificate* when it changed. :func:`refusal` says the same when Generate cannot reach
a backend. No Qt here: the panel shows a Lead, the tests read it.
"""
from __future__ import annotations

from dataclasses import dataclass

INSTALL, START, STOP, PROGRESS = "install", "start", "stop", "progress"
TRUST, FORGET = "trust", "forget"  # a remote backend's certificate (link/remote.py)

# the dot's colour per tone
TONES = {"ok": "#3a9a3a", "busy": "#c08a00", "idle": "#808080", "problem": "#c0392b"}


@dataclass(frozen=True)
class Facts:
    state: str  # the link's: connected / starting / connecting / unreachable / disconnected
    message: str  # the link's sentence (the real address, the backend's last words)
    reason: str = ""  # why the last health check failed (the client's error code)
    process: str = "stopped"  # the backend this docker started: stopped/starting/ready/failed
    ours: bool = False  # that backend is running
    command: str | None = None  # what Start backend runs (None: no backend found)
    configured: bool = False  # the painter set that command (⚙ ▸ Advanced)
    address: str = ""  # the backend address the painter set ("" none)
    bundled: str = ""  # the backend version this plugin carries ("" none: nothing to install)
    installing: bool = False
    install_status: str = ""  # the installer's latest progress text
    remote: bool = False  # a backend on another machine (``address`` is its address)


@dataclass(frozen=True)
class Lead:
    tone: str  # ok / busy / idle / problem (the dot's colour, TONES)
    text: str
    action: str = ""  # INSTALL / START / STOP / PROGRESS, "" none
    button: str = ""  # the main button's text ("" hidden)
    tip: str = ""
    open: bool = True  # shown in full; False: folded into the dot (connected)


START_TIP = "Start the Analogon backend on this computer; it stops when Krita quits."
STOP_TIP = "Stop the backend this docker started."
INSTALL_TIP = ("Install the Analogon backend (with PyTorch) into a folder of its own; you see "
               "what it downloads and can cancel.")
NOT_INSTALLED = "The Analogon backend is not installed yet."
NO_WHEEL = ("The Analogon backend is not installed, and this copy of the plugin does not carry it: "
            "install the release zip (analogon_krita-VERSION.zip) with Tools \u25b8 Scripts \u25b8 "
            "Import Python Plugin from File\u2026 and restart Krita.")
NOT_RUNNING = "The Analogon backend is installed but not running."


TRUST_TIP = "Show the certificate's fingerprint and trust it for this address."
FORGET_TIP = ("Forget the certificate trusted for this address; the docker then shows the new one's "
              "fingerprint and asks.")
REMOTE_HINT = ("Check the address and your token under \u2699 \u25b8 Connection, and that the backend "
               "runs on that machine.")


def _remote(f: Facts) -> Lead:
    """A backend on another machine: nothing to install or start here."""
    if f.state == "connected":
        return Lead("ok", f.message, open=False)
    if f.reason == "certificate_unknown":
        return Lead("problem", f.message, TRUST, "Trust certificate\u2026", TRUST_TIP)
    if f.reason == "certificate_changed":
        return Lead("problem", f.message, FORGET, "Forget the old certificate", FORGET_TIP)
    if f.state == "connecting":
        return Lead("busy", f.message)
    if not f.address or "\u2699" in f.message:  # the message says where to look already
        return Lead("problem", f.message)
    return Lead("problem", f"{f.message} {REMOTE_HINT}")


def decide(f: Facts) -> Lead:
    """The lead for these facts (see the module's docstring)."""
    if f.remote:
        return _remote(f)
    if f.installing:
        return Lead("busy", f"Installing the backend: {f.install_status or 'starting'}", PROGRESS,
                    "Show progress", "The installation's steps, downloads and log.")
    if f.state == "connected":
        return Lead("ok", f.message, STOP if f.ours else "", "Stop backend" if f.ours else "",
                    STOP_TIP if f.ours else "", open=False)
    if f.state == "starting" or f.process == "starting":
        return Lead("busy", f.message or "Starting the backend\u2026", STOP, "Stop backend", STOP_TIP)
    if f.process == "failed":  # its message names the cause (exit code, last words, the log)
        return Lead("problem", f.message, START, "Start backend", START_TIP)
    if f.address:  # the painter runs a backend there
        return Lead("problem", f"{f.message} Start the backend at that address, or clear the "
                    "address under \u2699 \u25b8 Advanced to use one this docker starts.",
                    START if f.command else "", "Start backend" if f.command else "", START_TIP)
    if f.command is None:
        if f.bundled:
            return Lead("idle", f"{NOT_INSTALLED} Install backend sets it up on this computer "
                        "(PyTorch included: a download of several GB, 5\u201320 minutes).",
                        INSTALL, "Install backend", INSTALL_TIP)
        return Lead("problem", NO_WHEEL + " Or start a backend yourself (analogon serve) and press \u21bb.")
    if f.state == "connecting":
        return Lead("busy", f.message, START, "Start backend", START_TIP)
    if f.reason in ("", "unreachable") and not f.configured:
        return Lead("idle", f"{NOT_RUNNING} Start backend starts it; it stops when Krita quits.",
                    START, "Start backend", START_TIP)
    return Lead("problem", f"{f.message} Start backend starts a new one.", START, "Start backend",
                START_TIP)


def refusal(f: Facts) -> str:
    """Why Generate cannot run now, and what to press."""
    lead = decide(f)
    if f.remote:
        return f"Cannot generate: {lead.text}"
    if lead.action == INSTALL:
        return "Cannot generate: the Analogon backend is not installed yet. Press \u201cInstall backend\u201d above."
    if lead.action == PROGRESS:
        return "Cannot generate yet: the backend is being installed. Generate works once it has started."
    if lead.tone == "idle" and lead.action == START:
        return "Cannot generate: the Analogon backend is not running. Press \u201cStart backend\u201d above."
    if lead.tone == "busy":
        return "Cannot generate yet: the backend is still starting. Press Generate again in a moment."
    if not lead.action:
        return f"Cannot generate: {lead.text}"
    return (f"Cannot generate: {f.message} Press \u201cStart backend\u201d, or check the backend "
            "address under \u2699 \u25b8 Advanced.")


def find_command(settings) -> tuple[str | None, bool]:
    """What Start backend would run, and whether the painter set it: the command in the
    settings, else a backend found on this computer (``backend_process.default_command``),
    else None."""
    configured = settings.get("backend_command").strip()
    if configured:
        return configured, True
    from ..link.backend_process import default_command

    found = default_command()
    return (None if found == "analogon" else found), False


def facts(link, installer=None) -> Facts:
    """The facts of a :class:`connection.Connection` (and the installer, when there is one)."""
    command, configured = find_command(link.settings)
    from ..install import installer as inst
    from ..link import remote

    wheel = installer.wheel if installer is not None else inst.bundled_wheel()
    far = bool(getattr(link, "remote", False))
    address = (remote.remote_url(link.settings) if far else link.settings.get("backend_url").strip())
    return Facts(state=link.state, message=link.message, reason=getattr(link, "reason", ""),
                 process=link.process.state, ours=link.process.running, command=command,
                 configured=configured, address=address, remote=far,
                 bundled=inst.wheel_version(wheel) if wheel else "",
                 installing=bool(installer is not None and installer.running),
                 install_status=getattr(installer, "status", "") if installer is not None else "")

"""A backend on another machine (a studio's GPU server, docs/studio.md): its address and the
painter's token, its TLS certificate trusted by fingerprint, and how images travel there.

- **Where**: the settings say ``connection = remote`` with ``remote_url`` and ``remote_token``;
  the link (:mod:`connection`) then talks to that address only and never starts or installs a
  backend of its own.
- **Which certificate**: a studio's backend usually presents a self-signed certificate, which no
  authority vouches for. The docker trusts it by its SHA-256 fingerprint, as SSH trusts a host
  key: on first contact the painter is shown the fingerprint and asked (:class:`TrustPrompt`);
  once trusted it is pinned per address (``pinned_certificates``) and a later connection
  ignores the certificate's errors only when it presents exactly that certificate
  (:meth:`client.Client._on_ssl_errors`). A different one is refused before anything, the token
  included, is sent, with both fingerprints named; forgetting the pinned one (the lead's button
  or the Connection tab) lets the painter accept the new one.
- **How images travel**: :func:`upload_format`.

The fingerprint is written as ``openssl x509 -noout -fingerprint -sha256`` and the backend print
it: upper-case hex pairs of the SHA-256 of the certificate's DER bytes, joined by colons.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ..qt import QCryptographicHash, QObject, Qt, QTimer, QtWidgets, exec_loop, pyqtSignal, to_bytes

MODE, URL, TOKEN, PINS = "connection", "remote_url", "remote_token", "pinned_certificates"
EXAMPLE_URL = "https://gpu-box.studio.lan:7871"
WHERE = "\u2699 \u25b8 Connection"
UNKNOWN, CHANGED = "certificate_unknown", "certificate_changed"


# -- settings --------------------------------------------------------------------------------

def is_remote(settings) -> bool:
    """Whether the painter chose a backend on another machine."""
    return settings.get(MODE).strip().lower() == "remote"


def normalize_url(text: str) -> str:
    """What the painter typed as an address: ``https://`` when no scheme is given, no slash at
    the end."""
    text = (text or "").strip().rstrip("/")
    if text and "://" not in text:
        text = "https://" + text
    return text


def remote_url(settings) -> str:
    return normalize_url(settings.get(URL))


def remote_token(settings) -> str:
    return settings.get(TOKEN).strip()


def origin(url: str) -> str:
    """The key a certificate is pinned under: scheme, host and port (``https://host:7871``)."""
    try:
        u = urlsplit(normalize_url(url))
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return normalize_url(url).lower()
    host = (u.hostname or "").lower()
    return f"{u.scheme.lower()}://{f'[{host}]' if ':' in host else host}:{port}"


def is_loopback(url: str) -> bool:
    try:
        host = (urlsplit(normalize_url(url)).hostname or "").lower()
    except ValueError:
        return False
    return host in ("localhost", "::1") or host.startswith("127.")


def pins(settings) -> dict[str, str]:
    data = settings.get_json(PINS, {})
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def pinned(settings, url: str) -> str:
    """The fingerprint trusted for ``url``'s address ("" none)."""
    return pins(settings).get(origin(url), "")


def pin(settings, url: str, fp: str) -> None:
    data = pins(settings)
    data[origin(url)] = fp
    settings.set_json(PINS, data)


def forget(settings, url: str) -> bool:
    """Forget the certificate trusted for ``url``; whether there was one."""
    data = pins(settings)
    had = data.pop(origin(url), None) is not None
    settings.set_json(PINS, data)
    return had


def chosen_upload_format(settings) -> str:
    """The upload format setting as the painter left it (see :func:`upload_format`)."""
    fmt = settings.get("upload_format").strip().lower()
    if not fmt:
        fmt = "png" if settings.get("image_format").strip().lower() == "png" else "auto"
    return fmt


def upload_format(settings) -> str:
    """How the docker sends images (``upload_format``): ``auto`` (the default) sends raw RGBA to
    a backend on this computer (the fastest there: nothing to encode) and, to a backend on
    another machine, whichever of raw, compressed raw (deflate) and PNG measures smallest for
    each image (:meth:`client.ImagePayload.from_rgba`); ``rgba``, ``deflate`` and ``png`` are
    used as they are. Not set yet: PNG if the painter chose it in the earlier setting
    (``image_format``, whose ``rgba`` every saved settings dialog wrote), else ``auto``."""
    fmt = chosen_upload_format(settings)
    if fmt == "auto":
        return "auto" if is_remote(settings) else "rgba"
    return fmt if fmt in ("rgba", "deflate", "png") else "rgba"


# -- certificates ----------------------------------------------------------------------------

def format_fingerprint(digest: bytes) -> str:
    text = digest.hex().upper()
    return ":".join(text[i:i + 2] for i in range(0, len(text), 2))


def fingerprint(cert) -> str:
    """A QSslCertificate's SHA-256 fingerprint, as openssl writes it ("" for a null one)."""
    if cert is None or cert.isNull():
        return ""
    return format_fingerprint(to_bytes(cert.digest(QCryptographicHash.Algorithm.Sha256)))


def certificate_message(problem: dict[str, Any]) -> str:
    """What the painter reads when a certificate is not (or no longer) the trusted one."""
    url, fp, old = problem.get("url", ""), problem.get("fingerprint", ""), problem.get("pinned", "")
    if old:
        return (f"The backend at {url} presents a different TLS certificate from the one this docker "
                f"trusts, so nothing was sent to it (not even your token). It presents SHA-256 {fp}; "
                f"the trusted one is {old}. If the server's owner tells you that the certificate was "
                f"renewed (and its new fingerprint is the one above), press \u201cForget the old "
                f"certificate\u201d (or Forget under {WHERE}) and trust the new one; otherwise "
                "someone may be pretending to be the server.")
    return (f"The backend at {url} presents a TLS certificate that no authority vouches for "
            f"(self-signed), with the SHA-256 fingerprint {fp}. Compare it with the fingerprint "
            "the server's owner gave you, and trust it only if they are the same.")


def question_text(problem: dict[str, Any]) -> str:
    return (f"The backend at {problem.get('url', '')} presents a certificate this docker has not "
            f"seen before. Its SHA-256 fingerprint is:\n\n{problem.get('fingerprint', '')}\n\n"
            "Compare it with the fingerprint the server's owner gave you (the backend prints it when it "
            "starts). Trust this certificate? The docker then connects to this address only while it "
            "presents exactly this certificate.")


class TrustPrompt(QObject):
    """Asks the painter to trust a certificate on first contact (once per address and
    fingerprint while Krita runs; the lead's *Trust certificate…* asks again), and forgets a
    pinned one on request. ``ask`` is the question (the tests answer it themselves)."""

    trusted = pyqtSignal(str)  # the fingerprint trusted

    def __init__(self, link, parent_widget=None):
        super().__init__(parent_widget or link)  # goes with its docker
        self.link = link
        self.parent_widget = parent_widget
        if not hasattr(link, "_certificates_asked"):  # shared by the dockers of all windows
            link._certificates_asked = set()
        self._asked: set[tuple[str, str]] = link._certificates_asked
        link.certificateProblem.connect(self._on_problem)

    def _on_problem(self, problem: dict):
        key = (origin(problem.get("url", "")), problem.get("fingerprint", ""))
        if problem.get("kind") != UNKNOWN or key in self._asked:
            return
        self._asked.add(key)
        QTimer.singleShot(0, lambda: self.offer(problem))  # after the reply's own slot has ended

    def offer(self, problem: dict | None = None) -> bool:
        """Show the fingerprint and ask; pin it and connect when the painter trusts it."""
        problem = problem or self.link.certificate
        if not problem or problem.get("kind") != UNKNOWN or problem != self.link.certificate:
            return False  # answered already, or no longer the question (another address)
        if not self.ask("Trust this backend's certificate?", question_text(problem)):
            return False
        self.link.trust(problem["fingerprint"])
        self.trusted.emit(problem["fingerprint"])
        return True

    def forget(self) -> None:
        self.link.forget_certificate()

    def ask(self, title: str, text: str) -> bool:
        Buttons = QtWidgets.QMessageBox.StandardButton
        box = QtWidgets.QMessageBox(QtWidgets.QMessageBox.Icon.Question, title, text,
                                    Buttons.Yes | Buttons.No, self.parent_widget)
        box.setDefaultButton(Buttons.No)
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        return exec_loop(box) == Buttons.Yes


# -- the settings dialog's Connection tab ----------------------------------------------------

class RemotePage(QtWidgets.QWidget):
    """Where the backend runs: on this computer (the docker installs and starts it), or on
    another machine (its address, the painter's token, the certificate trusted for it)."""

    modeChanged = pyqtSignal(bool)  # remote

    def __init__(self, controller, parent=None):
        super().__init__(parent)
        self.c = controller
        self.settings = controller.settings
        lay = QtWidgets.QVBoxLayout(self)
        self.local_choice = QtWidgets.QRadioButton("A backend on this computer (the docker installs and "
                                                   "starts it)")
        self.remote_choice = QtWidgets.QRadioButton("A backend on another machine (a studio's GPU server)")
        lay.addWidget(self.local_choice)
        lay.addWidget(self.remote_choice)
        self.remote_box = QtWidgets.QWidget()
        form = QtWidgets.QFormLayout(self.remote_box)
        form.setContentsMargins(18, 0, 0, 0)
        self.url = QtWidgets.QLineEdit(self.settings.get(URL))
        self.url.setObjectName("remote_url")
        self.url.setPlaceholderText(EXAMPLE_URL)
        self.url.setToolTip("The backend's address, from the server's owner: https://, the machine's "
                            "name or address, and the port. Through an SSH tunnel: http://127.0.0.1:PORT.")
        form.addRow("Address", self.url)
        self.token = QtWidgets.QLineEdit(self.settings.get(TOKEN))
        self.token.setObjectName("remote_token")
        self.token.setEchoMode(QtWidgets.QLineEdit.EchoMode.Password)
        self.token.setToolTip("Your token for that backend (its owner makes it with "
                              "\u201canalogon tokens create YOUR-NAME\u201d).")
        form.addRow("Token", self.token)
        self.certificate = QtWidgets.QLabel()
        self.certificate.setObjectName("remote_certificate")
        self.certificate.setWordWrap(True)
        self.certificate.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow("Certificate", self.certificate)
        self.forget_button = QtWidgets.QPushButton("Forget the trusted certificate")
        self.forget_button.setObjectName("forget_certificate")
        self.forget_button.setToolTip("The docker asks again on the next connection and shows the "
                                      "fingerprint the backend presents then.")
        form.addRow("", self.forget_button)
        note = QtWidgets.QLabel("The docker never starts or installs a backend of its own for this "
                                "connection. Ask the server's owner for the address, your token and the "
                                "certificate's fingerprint (docs/studio.md).")
        note.setWordWrap(True)
        form.addRow(note)
        lay.addWidget(self.remote_box)
        lay.addStretch(1)
        (self.remote_choice if is_remote(self.settings) else self.local_choice).setChecked(True)
        self.remote_choice.toggled.connect(self._show_mode)
        self.url.textChanged.connect(lambda _: self.show_certificate())
        self.forget_button.clicked.connect(self.forget)
        self._show_mode(self.remote_choice.isChecked())

    def remote(self) -> bool:
        return self.remote_choice.isChecked()

    def _show_mode(self, remote: bool):
        self.remote_box.setEnabled(remote)
        self.show_certificate()
        self.modeChanged.emit(remote)

    def show_certificate(self):
        url = normalize_url(self.url.text())
        fp = pinned(self.settings, url) if url else ""
        if fp:
            self.certificate.setText(f"Trusted: SHA-256 {fp}")
        elif url.startswith("http://"):
            self.certificate.setText("None: http:// is not encrypted" + (
                " (fine through an SSH tunnel)." if is_loopback(url) else
                ": your token and images would cross the network in clear. Use https://."))
        else:
            self.certificate.setText("None trusted yet: the docker shows the certificate's fingerprint "
                                     "on the first connection and asks you.")
        self.forget_button.setEnabled(bool(fp))

    def forget(self):
        url = normalize_url(self.url.text())
        if not url:
            return
        if origin(url) == origin(getattr(self.c.link.server, "url", "") or "") and is_remote(self.settings):
            self.c.link.forget_certificate()  # the link in use: it connects again and asks
        else:
            forget(self.settings, url)
        self.show_certificate()

    def save(self):
        self.settings.set(MODE, "remote" if self.remote() else "local")
        self.settings.set(URL, normalize_url(self.url.text()))
        self.settings.set(TOKEN, self.token.text().strip())

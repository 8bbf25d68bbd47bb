"""TLS for a backend that other machines reach (docs/studio.md).

uvicorn serves TLS itself (``ssl_certfile``/``ssl_keyfile``). The certificate is the user's
(``--tls-cert``/``--tls-key``), or, with ``--tls`` alone, a self-signed one that the backend
makes on its first start in ``<state>/tls/`` and keeps: its SHA-256 fingerprint is what a
client pins (trust on first use, as SSH does), so it must not change from one start to the
next. The certificate is made with the ``openssl`` command (the ``cryptography`` package is
not a dependency of the backend).

The fingerprint is written as ``openssl x509 -noout -fingerprint -sha256`` writes it: the
SHA-256 of the certificate's DER bytes, upper-case hex pairs joined by colons.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import AnalogonError

log = logging.getLogger(__name__)

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
SELF_SIGNED_DAYS = 3650
_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class TlsInfo:
    certfile: Path
    keyfile: Path
    fingerprint_sha256: str
    self_signed: bool  # made by the backend (--tls alone)

    def to_json(self) -> dict:
        return {"enabled": True, "fingerprint_sha256": self.fingerprint_sha256,
                "self_signed": self.self_signed}


def fingerprint(der: bytes) -> str:
    """``AB:CD:...``: the SHA-256 of a certificate's DER bytes, as openssl prints it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def pem_to_der(pem: bytes) -> bytes:
    """The first certificate of a PEM file (the server's own; a chain follows it)."""
    m = _PEM_CERT_RE.search(pem)
    if m is None:
        raise ValueError("no PEM certificate")
    return base64.b64decode(b"".join(m.group(1).split()), validate=True)


def fingerprint_of_file(path: str | os.PathLike) -> str:
    try:
        return fingerprint(pem_to_der(Path(path).read_bytes()))
    except OSError as e:
        raise AnalogonError("tls_bad_certificate", f"Cannot read the TLS certificate {path} ({e.strerror}).",
                            {"path": str(path)}) from None
    except (ValueError, binascii.Error):
        raise AnalogonError("tls_bad_certificate", f"{path} is not a PEM certificate (a file that begins "
                            "with -----BEGIN CERTIFICATE-----).", {"path": str(path)}) from None


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the backend on this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def wants_tls(settings) -> bool:
    return bool(getattr(settings, "tls_self_signed", False) or getattr(settings, "tls_certfile", None))


INSECURE_MESSAGE = (
    "Listening on {host} without TLS would send the backend's token, and every image, across the "
    "network in clear: anyone who can watch the network could read the token and use this backend. "
    "Add --tls (a self-signed certificate made on the first start; its fingerprint is printed for "
    "the painters to compare), or --tls-cert FILE --tls-key FILE for a certificate you have. On a "
    "network you trust completely, --insecure starts without TLS anyway. An SSH tunnel "
    "(ssh -L 7871:127.0.0.1:7871 THIS-MACHINE) needs neither: see docs/studio.md.")


def check_exposure(settings) -> None:
    """Refuse a start that would expose the backend carelessly: a non-loopback address needs
    ``allow_remote``, and then TLS (or ``insecure``, said explicitly)."""
    host = settings.host
    if is_loopback(host):
        return
    if not settings.allow_remote:
        raise AnalogonError("remote_not_allowed", f"Listening on {host} exposes the backend to other "
                            "machines; add --allow-remote (with --tls) if you mean it.")
    if not wants_tls(settings) and not getattr(settings, "insecure", False):
        raise AnalogonError("insecure_remote", INSECURE_MESSAGE.format(host=host), {"host": host})


def _san(hosts: list[str]) -> str:
    names, seen = [], set()
    for h in ["localhost", "127.0.0.1", "::1", *hosts]:
        h = (h or "").strip().strip("[]")
        if not h or h in ("0.0.0.0", "::") or h in seen:
            continue
        seen.add(h)
        try:
            ipaddress.ip_address(h)
            names.append(f"IP:{h}")
        except ValueError:
            if re.fullmatch(r"[A-Za-z0-9.-]{1,253}", h):
                names.append(f"DNS:{h}")
    return ",".join(names)


def make_self_signed(folder: Path, hosts: list[str] | None = None) -> tuple[Path, Path]:
    """A new self-signed certificate and its key (P-256) in ``folder`` with the ``openssl``
    command; the key is readable by the user only."""
    exe = shutil.which("openssl")
    if exe is None:
        raise AnalogonError(
            "tls_no_openssl", "--tls alone makes a self-signed certificate with the openssl command, "
            "which is not installed here. Install OpenSSL, or give a certificate you have with "
            "--tls-cert FILE --tls-key FILE.")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(folder, 0o700)
    except OSError:
        pass
    cert, key = folder / CERT_NAME, folder / KEY_NAME
    tmp_cert, tmp_key = folder / f".{CERT_NAME}.{os.getpid()}.tmp", folder / f".{KEY_NAME}.{os.getpid()}.tmp"
    # the key file exists, empty and private, before openssl writes into it
    os.close(os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    cmd = [exe, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-keyout", str(tmp_key), "-out", str(tmp_cert), "-days", str(SELF_SIGNED_DAYS),
           "-subj", "/CN=Analogon backend", "-addext", f"subjectAltName={_san(hosts or [])}",
           "-addext", "basicConstraints=critical,CA:FALSE"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise AnalogonError("tls_openssl_failed", "openssl could not make a self-signed certificate: "
                                + (r.stderr.strip().splitlines() or ["no message"])[-1],
                                {"command": " ".join(cmd)})
        os.chmod(tmp_key, 0o600)
        os.replace(tmp_key, key)
        os.replace(tmp_cert, cert)
    finally:
        for p in (tmp_cert, tmp_key):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
    return cert, key


def check_pair(certfile: Path, keyfile: Path) -> None:
    """The certificate and key load together (the server would fail later, in its thread)."""
    for p, what in ((certfile, "certificate"), (keyfile, "key")):
        if not Path(p).is_file():
            raise AnalogonError("tls_missing_file", f"The TLS {what} file {p} does not exist.",
                                {"path": str(p)})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except (ssl.SSLError, OSError) as e:
        raise AnalogonError("tls_bad_certificate", f"The TLS certificate {certfile} and key {keyfile} "
                            f"cannot be used together ({e}).",
                            {"certfile": str(certfile), "keyfile": str(keyfile)}) from None


def prepare(settings, state_dir: Path) -> TlsInfo | None:
    """The TLS the settings ask for, or None: the user's certificate, else (``tls_self_signed``)
    the one in ``<state>/tls/``, made now when there is none."""
    certfile = getattr(settings, "tls_certfile", None)
    keyfile = getattr(settings, "tls_keyfile", None)
    if certfile or keyfile:
        if not (certfile and keyfile):
            raise AnalogonError("tls_missing_file", "--tls-cert and --tls-key go together: give both.")
        certfile, keyfile = Path(certfile).expanduser(), Path(keyfile).expanduser()
        self_signed = False
    elif getattr(settings, "tls_self_signed", False):
        folder = state_dir / "tls"
        certfile, keyfile = folder / CERT_NAME, folder / KEY_NAME
        if not (certfile.is_file() and keyfile.is_file()):
            host = getattr(settings, "host", "")
            make_self_signed(folder, [socket.gethostname(), socket.getfqdn(), host])
            log.warning("made a self-signed TLS certificate in %s", folder)
        self_signed = True
    else:
        return None
    check_pair(certfile, keyfile)
    return TlsInfo(certfile, keyfile, fingerprint_of_file(certfile), self_signed)

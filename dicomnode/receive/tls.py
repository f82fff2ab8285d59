"""DICOM TLS for the listener (PS3.15 B.12, the BCP 195 TLS profile) (EDGE).

With ``node.tls_cert_file`` and ``node.tls_key_file`` set, every connection must begin with a
TLS handshake (TLS 1.2 or 1.3, ``node.tls_min_version``; TLS 1.2 only with ECDHE and AES-GCM
or ChaCha20-Poly1305) before any DICOM PDU; a peer that speaks plain TCP, or fails the
handshake, is disconnected before association negotiation and the failure is logged (one
WARNING: address and reason). With ``node.tls_ca_file`` a client certificate is requested and,
if given, must chain to that CA; with ``node.tls_require_client_cert`` a client without one is
refused during the handshake. The handshake runs in the connection's own thread within
``node.association_request_seconds`` (see :mod:`dicomnode.receive.server`). The files are
checked when the listener starts (:func:`server_tls_context`).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pynetdicom.association import Association

from dicomnode.config import Config, read_secret
from dicomnode.errors import ConfigError

#: TLS 1.2 cipher suites (OpenSSL names): forward secrecy and AEAD only, the suites BCP 195
#: (RFC 9325 4.2) recommends plus ChaCha20-Poly1305. TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_tls_context(config: Config, section: str = "node") -> ssl.SSLContext | None:
    """The TLS context of the server that ``section`` configures (``node``: the DICOM
    listener, ``http``: the status page), or ``None`` when its ``tls_cert_file`` is not set.

    Checks the configured files and the key password now, so that a bad setting stops the
    node at start-up with a message that names the key.

    Raises
    ------
    dicomnode.errors.ConfigError
        A file is missing, unreadable or not PEM; the key does not match the certificate; the
        key is encrypted and no (or a wrong) password is configured.
    """
    server = getattr(config, section)
    if not server.tls:
        return None
    cert = _tls_file(config, section, "tls_cert_file")
    key = _tls_file(config, section, "tls_key_file")
    ca = _tls_file(config, section, "tls_ca_file") if server.tls_ca_file else None
    try:
        password = read_secret(server.tls_key_password_env, server.tls_key_password_file)
    except ConfigError as exc:
        which = "tls_key_password_env" if server.tls_key_password_env else "tls_key_password_file"
        raise ConfigError(f"{section}.{which}: {exc}") from None

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if server.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION

    _check_certificates(cert, f"{section}.tls_cert_file")
    try:
        # A callable, so that OpenSSL never prompts on the terminal for an encrypted key.
        context.load_cert_chain(cert, key, password=lambda: _key_password(password, section))
    except ssl.SSLError as exc:  # a ConfigError from _key_password passes through
        if "KEY_VALUES_MISMATCH" in str(exc.reason) or "key values mismatch" in str(exc):
            raise ConfigError(
                f"{section}.tls_key_file: {key} does not match the certificate in {cert}"
            ) from None
        if password is not None:
            raise ConfigError(
                f"{section}.tls_key_file: cannot read the private key {key} with the configured "
                f"password (wrong password, or not a PEM key): {exc.reason or exc}"
            ) from None
        raise ConfigError(
            f"{section}.tls_key_file: {key} is not a readable PEM private key: {exc.reason or exc}"
        ) from None
    if ca is not None:
        _check_certificates(ca, f"{section}.tls_ca_file")
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = (
            ssl.CERT_REQUIRED if server.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE  # no client certificate is asked for
    return context


def _tls_file(config: Config, section: str, key: str) -> Path:
    """The resolved path of a TLS file setting, checked to be a readable file."""
    path = config.resolve(Path(getattr(getattr(config, section), key)))
    if not path.is_file():
        raise ConfigError(f"{section}.{key}: {path} does not exist or is not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{section}.{key}: cannot read {path}: {exc.strerror or exc}") from None
    return path


def _check_certificates(path: Path, key: str) -> None:
    """Refuse a file that holds no PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(f"{key}: no PEM certificate in {path}: {exc.reason or exc}") from None


def _key_password(password: str | None, section: str) -> str:
    if password is None:
        raise ConfigError(
            f"{section}.tls_key_file: the private key is encrypted; name its password with "
            "tls_key_password_env or tls_key_password_file"
        )
    return password


def address_text(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def tls_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake (OpenSSL's reason code where there is one)."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "no handshake in time (node.association_request_seconds)"
    return str(exc) or type(exc).__name__


def transport_text(assoc: Association) -> str:
    """``plain TCP``, or the TLS version and the client certificate's Common Name."""
    holder = assoc.dul.socket
    sock = holder.socket if holder is not None else None
    sock = getattr(sock, "raw", sock)  # the socket inside a guarded connection
    if not isinstance(sock, ssl.SSLSocket):
        return "plain TCP"
    version = sock.version() or "TLS"
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        cert = None
    if not cert:
        return f"{version}, no client certificate"
    names = [
        value
        for rdn in cert.get("subject", ())
        for name, value in rdn
        if name == "commonName"
    ]
    return f"{version}, client certificate CN {names[0] if names else '(none)'!r}"



"""A throw-away PKI made with the ``openssl`` command, for TLS tests (test helper).

``make_pki(folder)`` writes a CA (``ca.crt``/``ca.key``), a server certificate for
localhost / 127.0.0.1 (``server.crt``/``server.key``, and ``server-encrypted.key``), a client
certificate from the CA (``client.*``), and a client certificate from another, untrusted CA
(``rogue.*``, ``rogue-ca.*``). Certificates are valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


@dataclass(frozen=True)
class Pki:
    folder: Path

    def __getitem__(self, name: str) -> str:
        """``pki["client.key"]``: the path of one of the files, as a string."""
        path = self.folder / name
        assert path.is_file(), path
        return str(path)


def _openssl(*arguments: str, cwd: Path) -> None:
    done = subprocess.run([OPENSSL, *arguments], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def _make_ca(folder: Path, name: str, common_name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={common_name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _make_leaf(folder: Path, name: str, common_name: str, ca: str, extensions: list[str]) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
             cwd=folder)
    (folder / f"{name}.ext").write_text(
        "\n".join(["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
                   *extensions]) + "\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=folder)


def make_pki(folder: Path, *, key_password: str) -> Pki:
    """Write the files listed in the module docstring into ``folder``."""
    _make_ca(folder, "ca", "dicomnode test CA")
    _make_ca(folder, "rogue-ca", "rogue CA")
    _make_leaf(folder, "server", "localhost", "ca",
               ["subjectAltName=DNS:localhost,IP:127.0.0.1", "extendedKeyUsage=serverAuth"])
    _make_leaf(folder, "client", "storescu-client", "ca", ["extendedKeyUsage=clientAuth"])
    _make_leaf(folder, "rogue", "rogue-client", "rogue-ca", ["extendedKeyUsage=clientAuth"])
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", f"pass:{key_password}",
             "-out", "server-encrypted.key", cwd=folder)
    return Pki(folder)

"""A real Orthanc PACS for integration tests, on loopback high ports in a temporary folder.

Never touches the system configuration in ``/etc/orthanc``: each :class:`Orthanc` writes its
own JSON configuration and runs ``/usr/sbin/Orthanc <config>`` in the foreground with its own
storage and index directories, then is stopped with SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import requests
from pydicom import Dataset

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def terminate(process: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM a test server, wait, and kill it if it has not exited within ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """One Orthanc process with the DICOMweb plugin.

    Parameters
    ----------
    workdir
        Folder for the configuration, storage, index and log (e.g. pytest's ``tmp_path``).
    users
        ``{username: password}`` for HTTP basic authentication; none means no authentication.
    lua_script
        Lua source to load (``LuaScripts``), e.g. an ``OnStableSeries`` auto-router.
    modalities
        DICOM peers ``{name: (aet, host, port)}`` (``DicomModalities``).
    stable_age
        Seconds of silence before Orthanc calls a series stable (``StableAge``).
    aet
        Orthanc's own AE title.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        lua_script: str | None = None,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        stable_age: int = 60,
        aet: str = "ORTHANC",
    ) -> None:
        self.workdir = Path(workdir)
        self.users = dict(users or {})
        self.lua_script = lua_script
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.log_path = self.workdir / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None

    # -- addresses
    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str] | None:
        """Credentials of the first configured user, for the helpers below."""
        return next(iter(self.users.items()), None)

    # -- life cycle
    def config(self) -> dict:
        """The JSON configuration this instance runs with."""
        config: dict = {
            "Name": "dicomnode-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomModalities": {
                name: {"AET": aet, "Host": host, "Port": port}
                for name, (aet, host, port) in self.modalities.items()
            },
            "StableAge": self.stable_age,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 10,
        }
        if self.lua_script is not None:
            script = self.workdir / "script.lua"
            script.write_text(self.lua_script, encoding="utf-8")
            config["LuaScripts"] = [str(script)]
        return config

    def start(self, timeout: float = 30.0) -> "Orthanc":
        """Start Orthanc and wait until ``GET /system`` answers.

        Raises
        ------
        RuntimeError
            When Orthanc exits or does not answer within ``timeout``; the message holds the
            tail of its log.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [str(ORTHANC), str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                # TCP_NODELAY: without it DCMTK-based peers wait 40 ms per instance on loopback.
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.http_url}/system", auth=self.auth, timeout=1).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait, and kill if Orthanc has not exited within ``timeout``."""
        process, self._process = self._process, None
        terminate(process, timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST helpers
    def get(self, path: str) -> requests.Response:
        response = requests.get(f"{self.http_url}{path}", auth=self.auth, timeout=10)
        response.raise_for_status()
        return response

    def studies(self) -> list[str]:
        """Orthanc identifiers of the stored studies."""
        return list(self.get("/studies").json())

    def series_of_study(self, study_id: str) -> list[str]:
        return list(self.get(f"/studies/{study_id}").json()["Series"])

    def instances_of_series(self, series_id: str) -> list[str]:
        return list(self.get(f"/series/{series_id}").json()["Instances"])

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances").json())

    def download(self, instance_id: str) -> Dataset:
        return pydicom.dcmread(io.BytesIO(self.get(f"/instances/{instance_id}/file").content))

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        return {
            self.get(f"/instances/{i}").json()["MainDicomTags"]["SOPInstanceUID"]
            for i in self.instance_ids()
        }

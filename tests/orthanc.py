"""A real Orthanc PACS for tests, started on free ports with its own storage."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers import free_port, require


class Orthanc:
    """Orthanc started from the Debian package's binary with a private configuration."""

    ae_title = "ORTHANC"

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, str, int]] | None = None) -> None:
        binary = shutil.which("Orthanc")
        require(binary is not None, "Orthanc not installed (Debian package orthanc)")
        assert binary is not None
        self.binary = binary
        self.workdir = workdir
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = modalities or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "spine-node-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
            "Plugins": [],
            "StableAge": 1,
            "HttpTimeout": 60,
        }
        config = {k: v for k, v in config.items() if v is not None}
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self._log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([self.binary, str(path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST -------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout: float = 120) -> Any:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(raw)
        return raw

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, payload: Any) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self._request("POST", path, body)

    def upload(self, file: Path) -> str:
        """Store a DICOM file through the REST API; returns the Orthanc instance id."""
        result = self._request("POST", "/instances", file.read_bytes(), "application/dicom")
        return str(result["ID"])

    def instances(self) -> list[dict[str, Any]]:
        ids = self.get("/instances")
        return [self.get(f"/instances/{i}/simplified-tags") | {"ID": i} for i in ids]

    def file(self, instance_id: str) -> bytes:
        return bytes(self._request("GET", f"/instances/{instance_id}/file"))

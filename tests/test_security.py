"""Security: DICOM TLS (with and without client certificates), no PHI in logs or audit
rows, no secrets printed by the CLI.

Certificates are made by the test with ``cryptography``; the TLS peers are DCMTK's
echoscu/storescu (built with OpenSSL) and pynetdicom with an ``ssl`` context.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from spine_node.node.uids import derive_uid
from tests.dicom_factory import write_ct_series
from tests.nodeproc import NodeProcess, wait_for
from tests.peers import dcmtk, postgres_database
from tests.scu import association, echo_ok, store, write_with_meta

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert(name: str, key: rsa.RSAPrivateKey, issuer_name: str | None = None,
          issuer_key: rsa.RSAPrivateKey | None = None, ca: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _save(folder: Path, name: str, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server and a client certificate it signed, and a self-signed rogue client."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca_cert = _cert("spine test CA", ca_key, ca=True)
    _, ca_path = _save(folder, "ca", ca_key, ca_cert)
    out = {"ca": ca_path}
    for name in ("server", "client"):
        key = _key()
        out[f"{name}_key"], out[f"{name}_cert"] = _save(folder, name, key, _cert(name, key, "spine test CA", ca_key))
    rogue = _key()
    out["rogue_key"], out["rogue_cert"] = _save(folder, "rogue", rogue, _cert("rogue", rogue))
    return out


def _tls_env(pki: dict[str, Path], require_client_cert: bool) -> dict[str, str]:
    return {
        "SPINE_NODE_DICOM__TLS__ENABLED": "true",
        "SPINE_NODE_DICOM__TLS__CERT_FILE": str(pki["server_cert"]),
        "SPINE_NODE_DICOM__TLS__KEY_FILE": str(pki["server_key"]),
        "SPINE_NODE_DICOM__TLS__CA_FILE": str(pki["ca"]),
        "SPINE_NODE_DICOM__TLS__REQUIRE_CLIENT_CERT": str(require_client_cert).lower(),
    }


def _dcmtk(tool: str, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(tool), "-aet", "MODALITY", "-aec", "SPINE_NODE", *args, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def _client_context(pki: dict[str, Path], cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    context.check_hostname = False
    if cert:
        context.load_cert_chain(str(pki[f"{cert}_cert"]), str(pki[f"{cert}_key"]))
    return context


def test_tls_with_server_certificate_only(tmp_path: Path, pki: dict[str, Path]) -> None:
    files = write_ct_series(tmp_path / "in", derive_uid("tls", "study"), derive_uid("tls", "series"), 2)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with NodeProcess(tmp_path / "node", url, env=_tls_env(pki, require_client_cert=False)) as node:
        # DCMTK verifies the node's certificate against the CA; no client certificate.
        echo = _dcmtk("echoscu", node.port, "+tla", "+cf", str(pki["ca"]))
        assert echo.returncode == 0, echo.stderr
        push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "+tla", "+cf",
                               str(pki["ca"]), "127.0.0.1", str(node.port), *map(str, files)],
                              capture_output=True, text=True, timeout=60)
        assert push.returncode == 0, push.stderr
        for path in files:
            ds = dcmread(path)
            assert (node.data_dir / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID
                    / f"{ds.SOPInstanceUID}.dcm").is_file()
        # A client that does not trust the node's CA refuses to talk to it.
        wrong_ca = _dcmtk("echoscu", node.port, "+tla", "+cf", str(pki["rogue_cert"]))
        assert wrong_ca.returncode != 0
        # Plain DICOM on the TLS port gets nowhere, and the node stays up.
        plain = _dcmtk("echoscu", node.port, "-to", "10", "-ta", "10")
        assert plain.returncode != 0
        assert echo_ok(node.port, tls=_client_context(pki, None))
        status = node.cli("status", check=False)
        assert status.returncode == 0 and "up" in status.stdout, status.stdout + status.stderr


def test_tls_requiring_client_certificates(tmp_path: Path, pki: dict[str, Path]) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with NodeProcess(tmp_path / "node", url, env=_tls_env(pki, require_client_cert=True)) as node:
        signed = _dcmtk("echoscu", node.port, "+tls", str(pki["client_key"]), str(pki["client_cert"]),
                        "+cf", str(pki["ca"]))
        assert signed.returncode == 0, signed.stderr
        anonymous = _dcmtk("echoscu", node.port, "+tla", "+cf", str(pki["ca"]))
        assert anonymous.returncode != 0
        rogue = _dcmtk("echoscu", node.port, "+tls", str(pki["rogue_key"]), str(pki["rogue_cert"]),
                       "+cf", str(pki["ca"]))
        assert rogue.returncode != 0
        # pynetdicom as a TLS client: the same rules.
        assert echo_ok(node.port, tls=_client_context(pki, "client"))
        assert not _pynetdicom_echo(node.port, _client_context(pki, None))
        assert node.proc is not None and node.proc.poll() is None
        # The node's certificate is signed by the site CA, so `status` can probe it.
        status = node.cli("status", check=False)
        assert status.returncode == 0 and "up" in status.stdout, status.stdout + status.stderr


def _pynetdicom_echo(port: int, context: ssl.SSLContext) -> bool:
    try:
        return echo_ok(port, tls=context)
    except (OSError, ssl.SSLError):
        return False


# -- no PHI in logs or audit rows ---------------------------------------------------------

PHI = {"PatientName": "SECRET^PHI", "PatientID": "PID-12345", "AccessionNumber": "ACC-98765",
       "PatientBirthDate": "19010203", "OtherPatientIDs": "OPID-55555", "ReferringPhysicianName": "DR^WHO^PHI"}


def _with_phi(path: Path) -> Path:
    ds = dcmread(path)
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_no_phi_in_logs_audit_rows_or_cli_output(tmp_path: Path) -> None:
    study_uid = derive_uid("phi", "study")
    files = [_with_phi(p) for p in write_ct_series(tmp_path / "in", study_uid, derive_uid("phi", "series"), 3)]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    url = f"sqlite:///{tmp_path / 'node.db'}"
    env = {"SPINE_NODE_LOG_LEVEL": "DEBUG"}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "127.0.0.1",
                               str(node.port), *map(str, files)], capture_output=True, text=True, timeout=60)
        assert push.returncode == 0, push.stderr
        statuses = []
        with association(node.port) as assoc:
            # Devices that build UIDs from an accession number or patient ID.
            for keyword, value in (("StudyInstanceUID", PHI["AccessionNumber"]),
                                   ("SeriesInstanceUID", PHI["PatientID"]),
                                   ("SOPInstanceUID", "1.2.19010203.SECRET^PHI")):
                ds = dcmread(files[0])
                setattr(ds, keyword, value)
                if keyword == "SOPInstanceUID":
                    ds.file_meta.MediaStorageSOPInstanceUID = value
                statuses.append(store(assoc, ds))
            # Truncated, and without pixel data: refused with the PHI in the header.
            truncated = bad_dir / "truncated.dcm"
            raw = files[1].read_bytes()
            truncated.write_bytes(raw[: len(raw) - 4000])
            statuses.append(store(assoc, truncated))
            no_pixels = dcmread(files[2])
            del no_pixels.PixelData
            no_pixels.SOPInstanceUID = derive_uid("phi", "nopixels")
            no_pixels.file_meta.MediaStorageSOPInstanceUID = no_pixels.SOPInstanceUID
            statuses.append(store(assoc, no_pixels))
            # A mismatch between request and data set.
            mismatch = write_with_meta(dcmread(files[0]), bad_dir / "mismatch.dcm",
                                       meta_sop_instance=derive_uid("phi", "other"))
            statuses.append(store(assoc, mismatch))
        assert statuses == [0xC220, 0xC220, 0xC220, 0xC210, 0xA900, 0xC221]
        wait_for(lambda: _audit_text(url).count("series.complete") >= 1, timeout=60)
        cli_output = "".join(node.cli(*args).stdout for args in (("series", "list"), ("audit", "tail", "-n", "200")))
    haystacks = {"serve.log": node.log(), "database": _audit_text(url), "cli": cli_output,
                 "spool paths": "\n".join(str(p) for p in (node.data_dir / "spool").rglob("*"))}
    assert "instance.refused" in haystacks["database"] and "0xC220" in haystacks["serve.log"]
    for where, haystack in haystacks.items():
        for value in PHI.values():
            for form in {value, value.replace("^", " ")}:
                assert form not in haystack, f"{form!r} found in {where}"


def _audit_text(url: str) -> str:
    """Every text and JSON column of the audit, association and series tables."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = []
            for table in ("audit_events", "associations", "series"):
                rows += [json.dumps([str(v) for v in row]) for row in conn.execute(text(f"SELECT * FROM {table}"))]
            return "\n".join(rows)
    finally:
        engine.dispose()


# -- secrets ------------------------------------------------------------------------------

def test_database_password_is_never_printed(tmp_path: Path) -> None:
    with postgres_database() as url:
        # The test server trusts local connections, so any password works: a real-looking one.
        secret_url = url.replace("://postgres@", "://postgres:Sup3rS3cret-pw@")
        assert secret_url != url
        with NodeProcess(tmp_path / "node", secret_url) as node:
            status = node.cli("status", check=False)
            assert status.returncode == 0, status.stdout + status.stderr
            for args in (("series", "list"), ("audit", "tail"), ("db", "upgrade")):
                output = node.cli(*args, check=False)
                assert "Sup3rS3cret" not in output.stdout + output.stderr
            assert "postgres:***@" in status.stdout.replace("\n", "")
            assert "Sup3rS3cret" not in status.stdout + status.stderr
        assert "Sup3rS3cret" not in node.log() and "postgres:***@" in node.log().replace("\n", "")

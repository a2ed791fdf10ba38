"""DICOM TLS on the storage SCP, with a throw-away certificate authority made here (issue 21)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cohortflow.pipelines.pacs.errors import PacsError
from cohortflow.pipelines.pacs.scp import ScpTls, Spool, StorageSCP
from tests.ingest_helpers import free_port, pydicom_file

Issued = tuple[Path, Path]  # certificate, key (PEM)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    cert_file, key_file = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


class Authority:
    """A certificate authority that lives for one test."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle, _ = _write(folder, name, self.cert, self.key)

    def issue(self, stem: str, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = x509.oid.ExtendedKeyUsageOID
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.ExtendedKeyUsage([usage.SERVER_AUTH if server else usage.CLIENT_AUTH]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return _write(self.folder, stem, builder.sign(self.key, hashes.SHA256()), key)


def _client(authority: Authority, issued: Issued | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=authority.bundle)
    if issued is not None:
        context.load_cert_chain(*issued)
    return context


def _store(port: int, tls: ssl.SSLContext | None) -> int | None:
    """C-STORE one MR image as ORTHANC; the status, or None when no association was made."""
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="ORTHANC")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MRImageStorage)
    extra = {} if tls is None else {"tls_args": (tls, "localhost")}
    assoc = ae.associate("127.0.0.1", port, ae_title="COHORTFLOW", **extra)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(pydicom.dcmread(pydicom_file("MR_small.dcm")))
        return int(status.Status) if status else None
    finally:
        assoc.release()


@pytest.mark.integration
def test_the_storage_scp_speaks_dicom_tls_to_callers_of_its_ca_only(tmp_path: Path) -> None:
    ours, rogue = Authority(tmp_path, "hospital-ca"), Authority(tmp_path, "rogue-ca")
    server = ours.issue("scp", server=True)
    tls = ScpTls(server[0], server[1], client_ca=ours.bundle)
    spool = tmp_path / "spool" / "listen"
    port = free_port()
    scp = StorageSCP(Spool(spool), "COHORTFLOW", port, "127.0.0.1", ("ORTHANC",), tls).start()
    try:
        assert _store(port, _client(ours, ours.issue("pacs", server=False))) == 0x0000
        assert len(list(spool.rglob("*.dcm"))) == 1
        # plain DICOM, no client certificate, one from another CA: no association
        assert _store(port, None) is None
        assert _store(port, _client(ours, None)) is None
        assert _store(port, _client(ours, rogue.issue("intruder", server=False))) is None
        assert len(list(spool.rglob("*.dcm"))) == 1
    finally:
        scp.stop()


def test_a_tls_key_readable_by_others_or_missing_is_refused_by_name(tmp_path: Path) -> None:
    ours = Authority(tmp_path, "hospital-ca")
    certificate, key = ours.issue("scp", server=True)
    key.chmod(0o644)
    with pytest.raises(PacsError, match="readable by others"):
        ScpTls(certificate, key).context()
    key.chmod(0o600)
    ScpTls(certificate, key, ours.bundle).context()  # loads
    with pytest.raises(PacsError, match="cannot read the TLS key"):
        ScpTls(certificate, tmp_path / "absent.key").context()
    with pytest.raises(PacsError, match="cannot load"):
        ScpTls(ours.bundle, key).context()  # the key is not the certificate's


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from cohortflow.models.settings import RetrieveSettings, Settings
    from cohortflow.pipelines.retrieve.config import scp_tls

    with pytest.raises(ValidationError, match="set together"):
        RetrieveSettings(scp_tls_certificate=tmp_path / "scp.crt")
    with pytest.raises(ValidationError, match="needs scp_tls_certificate"):
        RetrieveSettings(scp_tls_client_ca=tmp_path / "ca.crt")
    plain = Settings(home=tmp_path)
    assert scp_tls(plain) is None
    tls = Settings(
        home=tmp_path,
        retrieve=RetrieveSettings(
            scp_tls_certificate=tmp_path / "scp.crt", scp_tls_key=tmp_path / "scp.key"
        ),
    )
    assert scp_tls(tls) == ScpTls(tmp_path / "scp.crt", tmp_path / "scp.key")

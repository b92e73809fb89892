import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import ExtendedKeyUsageOID

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "tls" / "make-certs.sh"


def run(*args):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_server_and_client_certificates(tmp_path):
    r = run(tmp_path, "--host", "coord.example", "--ip", "10.1.2.3", "--client", "site-a", "--days", "30")
    assert r.returncode == 0, r.stderr
    ca, server, client = load(tmp_path / "ca.crt"), load(tmp_path / "server.crt"), load(tmp_path / "clients" / "site-a.crt")
    for cert in (server, client):
        assert cert.issuer == ca.subject
        # raises InvalidSignature unless the CA signed it
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0


def test_existing_certificates_are_not_overwritten_and_ca_is_reused(tmp_path):
    assert run(tmp_path, "--client", "a").returncode == 0
    ca_before = (tmp_path / "ca.crt").read_bytes()
    again = run(tmp_path, "--client", "a")
    assert again.returncode != 0 and "not overwriting" in again.stderr
    assert run(tmp_path, "--client", "b").returncode == 0
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert load(tmp_path / "clients" / "b.crt").issuer == load(tmp_path / "ca.crt").subject


def test_bad_arguments_are_named(tmp_path):
    r = run(tmp_path, "--days", "soon")
    assert r.returncode == 2 and "--days" in r.stderr
    r = run(tmp_path, "--colour", "red")
    assert r.returncode == 2 and "--colour" in r.stderr

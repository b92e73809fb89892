"""TLS and mutual TLS handshakes with certificates made here; wrong certificates refused."""

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.testing import settings_for
from fedmla.protos.transport import CoordinatorClient, TLSConfig


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, name, server: bool):
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]),
                            critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca("fedmla test CA"), make_ca("some other CA")
    out = {"ca": ca[1].public_bytes(serialization.Encoding.PEM), "other_ca": other_ca[1].public_bytes(serialization.Encoding.PEM)}
    out["server_key"], out["server_cert"] = issue(ca, "localhost", server=True)
    out["client_key"], out["client_cert"] = issue(ca, "worker-1", server=False)
    out["rogue_key"], out["rogue_cert"] = issue(other_ca, "worker-1", server=False)
    for k, v in out.items():
        (d / f"{k}.pem").write_bytes(v)
    out["dir"] = d
    return out


def _server(tmp_path, pki, mtls):
    d = pki["dir"]
    kw = dict(tls_cert=d / "server_cert.pem", tls_key=d / "server_key.pem")
    if mtls:
        kw["tls_client_ca"] = d / "ca.pem"
    return BackgroundCoordinator(settings_for(tmp_path, **kw)).start()


def test_tls_handshake_and_untrusted_server_refused(tmp_path, pki):
    bg = _server(tmp_path, pki, mtls=False)
    try:
        token = bg.call(lambda: bg.store.create_token("w1"))
        with CoordinatorClient(bg.target, token, tls=TLSConfig(root_ca=pki["ca"]), timeout=10) as c:
            assert c.join(num_examples=5).client_id == "w1"
        # a client that does not trust the server's CA refuses the handshake
        with CoordinatorClient(bg.target, token, tls=TLSConfig(root_ca=pki["other_ca"]), timeout=5) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.get_task()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # plaintext against a TLS port does not get through either
        with CoordinatorClient(bg.target, token, timeout=5) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.get_task()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        bg.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path, pki):
    bg = _server(tmp_path, pki, mtls=True)
    try:
        token = bg.call(lambda: bg.store.create_token("w1"))
        good = TLSConfig(root_ca=pki["ca"], cert=pki["client_cert"], key=pki["client_key"])
        with CoordinatorClient(bg.target, token, tls=good, timeout=10) as c:
            assert c.join(num_examples=5).client_id == "w1"
        for tls in (TLSConfig(root_ca=pki["ca"]),                                               # no certificate
                    TLSConfig(root_ca=pki["ca"], cert=pki["rogue_cert"], key=pki["rogue_key"])):  # wrong CA
            with CoordinatorClient(bg.target, token, tls=tls, timeout=5) as c:
                with pytest.raises(grpc.RpcError) as e:
                    c.get_task()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # a good certificate does not replace the token
        with CoordinatorClient(bg.target, "fm1.0.bad", tls=good, timeout=10) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.get_task()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        bg.stop()

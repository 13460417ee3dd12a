"""Deployment keys: a TLS chain the server certificate verifies against, and distinct SSH node keys."""

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from simulations.launch.deploy_keys import generate_node_keys, generate_tls


def test_generated_certificates_and_node_keys(tmp_path):
    tls = generate_tls(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(tls.server_key.stat().st_mode & 0o777) == "0o600"
    keys = generate_node_keys(tmp_path / "keys", 2)
    private = load_ssh_private_key(keys[1].private_key.read_bytes(), None)
    public = load_ssh_public_key(keys[1].public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert keys[0].public_key.read_bytes() != keys[1].public_key.read_bytes()

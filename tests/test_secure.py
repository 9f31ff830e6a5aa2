"""Credentials of the secure deployment: the SuperLink certificate chains to the CA and names
every host; SuperNode keys are ECDSA P-384 in OpenSSH format, private files readable by the
owner only."""
from __future__ import annotations

import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from simulations.secure import make_certificates, make_node_keys


def test_server_certificate_is_signed_by_the_ca_for_every_host(tmp_path):
    files = make_certificates(tmp_path, ["127.0.0.1", "localhost", "link.example"])
    ca = x509.load_pem_x509_certificate(files["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(files["cert"].read_bytes())
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                           cert.signature_hash_algorithm)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert os.stat(files["key"]).st_mode & 0o077 == 0


def test_node_keys_are_openssh_ecdsa_p384_pairs(tmp_path):
    pairs = make_node_keys(tmp_path, 2)
    for private, public in pairs:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(public.read_bytes())
        assert isinstance(key.curve, ec.SECP384R1)
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert os.stat(private).st_mode & 0o077 == 0
    assert pairs[0][1].read_bytes() != pairs[1][1].read_bytes()

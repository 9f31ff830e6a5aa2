"""Credentials for a secure deployment: a CA with a SuperLink certificate, and SuperNode keys.

    python -m simulations.secure certs --out ~/fedeen-tls --hosts 127.0.0.1,localhost,link.example
    python -m simulations.secure node-keys --out ~/fedeen-keys --count 4

``certs`` writes ``ca.crt`` / ``ca.key`` (a self-signed CA, keep the key offline) and
``server.pem`` / ``server.key`` for the SuperLink, whose subject alternative names are the
given host names and IP addresses (every name SuperNodes and the ``flwr`` CLI use to reach it).
``node-keys`` writes ``node<i>`` / ``node<i>.pub``: ECDSA P-384 key pairs in OpenSSH format,
what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` take.

Written with the ``cryptography`` package (a Flower dependency), so no ``openssl`` or
``ssh-keygen`` binary is needed and the same code runs on every host. ``simulations.deploy_local``
uses both for its default secure mode; the README's deployment section shows the commands for
several hosts.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(out: Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A CA and a SuperLink certificate for ``hosts``; returns the files by role."""
    if not hosts:
        raise ValueError("give at least one host name or IP address for the SuperLink")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM
    key_format = dict(encoding=pem, format=serialization.PrivateFormat.TraditionalOpenSSL,
                      encryption_algorithm=serialization.NoEncryption())
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedeen deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return {
        "ca": _write(out / "ca.crt", ca.public_bytes(pem)),
        "ca-key": _write(out / "ca.key", ca_key.private_bytes(**key_format), private=True),
        "cert": _write(out / "server.pem", cert.public_bytes(pem)),
        "key": _write(out / "server.key", key.private_bytes(**key_format), private=True),
    }


def make_node_keys(out: Path, count: int, prefix: str = "node") -> list[tuple[Path, Path]]:
    """``count`` ECDSA P-384 key pairs in OpenSSH format: [(private, public), ...]."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        pairs.append((_write(out / f"{prefix}{i}", private, private=True),
                      _write(out / f"{prefix}{i}.pub", public + b"\n")))
    return pairs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("certs", help="a CA and the SuperLink's certificate")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--hosts", required=True, help="comma-separated names/IPs of the SuperLink")
    c.add_argument("--days", type=int, default=365)
    k = sub.add_parser("node-keys", help="SuperNode key pairs for node authentication")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--count", type=int, required=True)
    args = p.parse_args(argv)
    if args.command == "certs":
        files = make_certificates(args.out.expanduser(), args.hosts.split(","), args.days)
        for role, path in files.items():
            print(f"{role}: {path}")
    else:
        for private, public in make_node_keys(args.out.expanduser(), args.count):
            print(f"{private} {public}")


if __name__ == "__main__":
    main()

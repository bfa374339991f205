"""A federation's credentials: a private CA and the SuperLink's TLS certificate
(``make_certificates``; ``ca.crt`` goes to every SuperNode and to the machine running ``flwr``)
and SuperNode key pairs (``make_node_keys``: EC P-384 in OpenSSH format, as Flower's SuperNode
authentication expects; the SuperLink admin registers the ``.pub`` files with
``flwr supernode register``, each SuperNode keeps its private key).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path


def make_certificates(directory: str | Path, hosts: list[str], *, days: int = 365, force: bool = False) -> dict:
    """A private CA (``ca.crt``, ``ca.key``) and a SuperLink server certificate (``server.pem``,
    ``server.key``) valid for ``hosts`` (DNS names or IP addresses, as SuperNodes and ``flwr``
    will address the SuperLink). Keys are EC P-384; private keys are written mode 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("give at least one host name or IP address the SuperLink is reached at")
    d = Path(directory)
    files = {n: d / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if any(p.exists() for p in files.values()) and not force:
        raise FileExistsError(f"certificates exist in {d}; pass --force to replace them")
    sans: list = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", h):
                raise ValueError(f"not a host name or IP address: {h!r}") from None
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "baffle-edge Flower CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write_private(files["ca.key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    _write_private(files["server.key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    files["ca.crt"].write_bytes(ca.public_bytes(pem))
    files["server.pem"].write_bytes(cert.public_bytes(pem))
    return files


def make_node_keys(directory: str | Path, names: list[str], *, force: bool = False) -> dict[str, tuple[Path, Path]]:
    """One EC P-384 key pair per SuperNode name, in OpenSSH format (``NAME`` private, mode 0600;
    ``NAME.pub`` public): what ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(directory)
    out = {}
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
            raise ValueError(f"key name {name!r}: use letters, digits, '_', '-', '.'")
        priv, pub = d / name, d / f"{name}.pub"
        if (priv.exists() or pub.exists()) and not force:
            raise FileExistsError(f"{priv} exists; pass --force to replace it")
        out[name] = (priv, pub)
    d.mkdir(parents=True, exist_ok=True)
    for name, (priv, pub) in out.items():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return out


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)

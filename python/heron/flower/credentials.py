"""Credentials for a secured Flower deployment of heron (docs/flower.md, "Secure deployment").

    python -m heron.flower.credentials DIR --host SUPERLINK_HOST [--host ...] --nodes N

writes, with Python's `cryptography` (installed with flwr, so present wherever heron runs on Flower):

- `ca.crt`, `ca.key`: a certificate authority of this deployment (keep ca.key off the network);
- `superlink.crt`, `superlink.key`: the SuperLink's TLS certificate, signed by the CA, valid for every
  --host (names or IP addresses) and for localhost / 127.0.0.1 (the SuperLink's own ServerApp process
  connects to it locally);
- `node-<i>`, `node-<i>.pub` for i < N: SuperNode i's authentication key pair (ECDSA P-384, OpenSSH
  format, as `flower-supernode --auth-supernode-private-key` and `flwr supernode register` take them).

Private keys are written with mode 0600; nothing is overwritten (an existing DIR/ca.key is an error).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    with open(path, "xb") as file:  # "x": never overwrite
        file.write(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _certificate(subject: str, public_key, issuer: x509.Name, signer, *, ca: bool,
                 hosts: Sequence[str] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA256())


def make_credentials(directory: str | Path, hosts: Sequence[str], nodes: int) -> Path:
    """Write the CA, the SuperLink's certificate for `hosts` and `nodes` SuperNode key pairs into `directory`."""
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    if not hosts:
        raise ValueError("hosts must name at least one address the SuperNodes use to reach the SuperLink")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.key").exists():
        raise FileExistsError(f"{directory / 'ca.key'} exists; use a new directory for new credentials")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "heron Flower deployment CA")])
    ca_cert = _certificate("heron Flower deployment CA", ca_key.public_key(), ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate(hosts[0], server_key.public_key(), ca_name, ca_key, ca=False, hosts=hosts)
    _write(directory / "ca.key", _pem_key(ca_key), private=True)
    _write(directory / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(directory / "superlink.key", _pem_key(server_key), private=True)
    _write(directory / "superlink.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(directory / f"node-{i}", key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.OpenSSH,
                                                         serialization.NoEncryption()), private=True)
        _write(directory / f"node-{i}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                          serialization.PublicFormat.OpenSSH))
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heron.flower.credentials", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="where to write the files (created; must not hold credentials yet)")
    parser.add_argument("--host", action="append", required=True,
                        help="a name or IP address the SuperNodes and `flwr` use for the SuperLink (repeatable)")
    parser.add_argument("--nodes", type=int, required=True, help="number of SuperNode key pairs")
    args = parser.parse_args(argv)
    try:
        directory = make_credentials(args.directory, args.host, args.nodes)
    except (ValueError, FileExistsError) as error:
        print(f"heron.flower.credentials: {error}", file=sys.stderr)
        return 2
    print(f"wrote {directory}: ca.crt ca.key superlink.crt superlink.key"
          + "".join(f" node-{i} node-{i}.pub" for i in range(args.nodes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

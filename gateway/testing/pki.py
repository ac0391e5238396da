"""A throwaway two-level PKI (root CA, intermediate CA, server leaves) for tests and demos.

All keys are ECDSA P-256 and all certificates are SHA-256 signed and valid from
one day ago to 30 days ahead. The CA keys never leave memory; only the root
certificate and the issued leaves are written to disk.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""The names a leaf covers when :meth:`TestCA.issue` gets none: loopback by name and address."""

_BACKDATE = datetime.timedelta(days=1)
_LIFETIME = datetime.timedelta(days=30)


@dataclass(frozen=True)
class IssuedCertificate:
    """Paths of one issued server certificate.

    :ivar cert_path: PEM file holding the leaf certificate alone.
    :ivar key_path: PEM (PKCS#8, unencrypted) file holding the leaf's private key, mode 0600.
    :ivar chain_path: PEM file holding the leaf followed by the intermediate, i.e. what a
        server presents to clients that trust only the root.
    """

    cert_path: str
    key_path: str
    chain_path: str


class TestCA:
    """A root CA and an intermediate CA that issue server certificates into one directory.

    :ivar ca_path: PEM file holding the root certificate, the only trust anchor clients need.
    """

    # Keep pytest from collecting this class as a test case because of its name.
    __test__ = False

    def __init__(self, directory: str, name: str = "mailgateway test CA") -> None:
        """Create the root and intermediate CAs and write the root certificate to ``ca.pem``.

        :param directory: where certificates and keys go; created if missing.
        :param name: common name of the root CA; the intermediate gets `` intermediate`` appended.
        """
        os.makedirs(directory, exist_ok=True)
        self._directory = directory
        self._issued = 0
        now = datetime.datetime.now(datetime.timezone.utc)

        self._root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = _name(name)
        self._root_cert = _sign(
            _ca_builder(root_name, root_name, self._root_key.public_key(), now, path_length=1),
            self._root_key,
        )

        self._intermediate_key = ec.generate_private_key(ec.SECP256R1())
        intermediate_builder = _ca_builder(
            _name(f"{name} intermediate"),
            root_name,
            self._intermediate_key.public_key(),
            now,
            path_length=0,
        ).add_extension(_authority_key_id(self._root_cert), critical=False)
        self._intermediate_cert = _sign(intermediate_builder, self._root_key)

        self.ca_path: str = os.path.join(directory, "ca.pem")
        _write(self.ca_path, _pem(self._root_cert), 0o644)

    def issue(self, *names: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> IssuedCertificate:
        """Issue a server certificate for ``names``, signed by the intermediate CA.

        Each name that parses as an IPv4 or IPv6 address becomes an IP address
        subject alternative name; every other name becomes a DNS name. The first
        name is also the subject's common name. The files are named
        ``leaf<N>.pem``, ``leaf<N>.key`` and ``leaf<N>-chain.pem``, with ``N``
        counting the certificates this CA has issued.

        :param names: DNS names and IP addresses; :data:`DEFAULT_NAMES` when none are given.
        :param key: the leaf's private key (an RSA one, say); a new P-256 key when None.
        :returns: the paths of the written certificate, key and chain.
        """
        names = names or DEFAULT_NAMES
        now = datetime.datetime.now(datetime.timezone.utc)
        key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        not_after = min(now + _LIFETIME, self._intermediate_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self._intermediate_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(_authority_key_id(self._intermediate_cert), critical=False)
        )
        cert = _sign(builder, self._intermediate_key)

        self._issued += 1
        stem = os.path.join(self._directory, f"leaf{self._issued}")
        issued = IssuedCertificate(
            cert_path=f"{stem}.pem", key_path=f"{stem}.key", chain_path=f"{stem}-chain.pem"
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(issued.key_path, key_pem, 0o600)
        _write(issued.cert_path, _pem(cert), 0o644)
        _write(issued.chain_path, _pem(cert) + _pem(self._intermediate_cert), 0o644)
        return issued


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    *,
    path_length: int,
) -> x509.CertificateBuilder:
    # Critical basicConstraints and keyUsage, plus SKI, are what OpenSSL's
    # X509_V_FLAG_X509_STRICT demands of a CA certificate.
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _sign(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: str, data: bytes, mode: int) -> None:
    # Create with the final mode so that a key is never readable by others,
    # and fchmod in case the file already existed with a wider mode.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)

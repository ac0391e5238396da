"""
TLS operations on the real gateway process: certificates chosen by SNI, and SIGHUP picking up a
renewed certificate while an established session keeps working.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import tempfile

from cryptography import x509
from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.dovecot import DovecotSandbox
from gateway.testing.gateway import GatewayProcess
from gateway.testing.pki import TestCA

from .wire import Wire


def served_certificate(port: int, server_name: str | None) -> x509.Certificate:
    """The leaf certificate the gateway presents for a TLS client asking for C{server_name} (None: no SNI)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def names(certificate: x509.Certificate) -> list[str]:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


class SniAndReloadTests(SynchronousTestCase):
    """A gateway with a default certificate and one for mail.example.net, before and after SIGHUP."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="gw-tlsops-")
        os.chmod(self.directory, 0o755)
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.ca = TestCA(os.path.join(self.directory, "ca"))
        self.default = self.ca.issue("mail.example.org", "127.0.0.1")
        self.named = self.ca.issue("mail.example.net", "*.example.net")
        # The gateway reads these paths; renewals replace their contents.
        self.chain = os.path.join(self.directory, "fullchain.pem")
        self.key = os.path.join(self.directory, "privkey.pem")
        shutil.copy(self.default.chain_path, self.chain)
        shutil.copy(self.default.key_path, self.key)
        self.dovecot = DovecotSandbox(os.path.join(self.directory, "dovecot"), {"alice": "secret"})
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)
        sni = (f'[[tls.sni]]\nnames = ["mail.example.net", "*.example.net"]\n'
               f'certificate = "{self.named.chain_path}"\nprivate_key = "{self.named.key_path}"\n')
        self.gateway = GatewayProcess(os.path.join(self.directory, "gateway"), imap_backend_port=self.dovecot.imap_port,
                                      users={"alice": "secret"}, certificate=self.chain, private_key=self.key,
                                      settings=sni)
        self.gateway.start()
        self.addCleanup(self.gateway.stop)
        self.port = self.gateway.port("imap", "implicit_tls")

    def test_sni_selects_certificate(self) -> None:
        """A client asking for mail.example.net (or a name under it) gets that certificate; others the default."""
        self.assertEqual(names(served_certificate(self.port, "mail.example.net")), ["mail.example.net", "*.example.net"])
        self.assertEqual(names(served_certificate(self.port, "imap.example.net")), ["mail.example.net", "*.example.net"])
        self.assertEqual(names(served_certificate(self.port, "mail.example.org")), ["mail.example.org"])
        self.assertEqual(names(served_certificate(self.port, None)), ["mail.example.org"])

    def test_sighup_picks_up_renewed_certificate(self) -> None:
        """After SIGHUP new connections get the renewed certificate; a session established before goes on."""
        before = served_certificate(self.port, None)
        tls = ssl.create_default_context(cafile=self.ca.ca_path)
        session = Wire(self.port, tls=tls)
        session.line()
        session.send(b"a LOGIN alice secret\r\nb SELECT INBOX\r\n")
        self.assertTrue(session.until(b"b ")[-1].startswith(b"b OK"))

        renewed = self.ca.issue("mail.example.org", "127.0.0.1")
        shutil.copy(renewed.chain_path, self.chain)
        shutil.copy(renewed.key_path, self.key)
        assert self.gateway.pid is not None
        os.kill(self.gateway.pid, signal.SIGHUP)
        self.gateway.wait_for_log(r"reloaded path=")
        after = served_certificate(self.port, None)
        self.assertNotEqual(after.serial_number, before.serial_number)
        self.assertEqual(names(after), ["mail.example.org"])

        session.send(b"c NOOP\r\n")
        self.assertTrue(session.until(b"c ")[-1].startswith(b"c OK"))
        session.close()

    def test_broken_renewal_keeps_certificate(self) -> None:
        """A broken certificate file on SIGHUP is logged and the running certificate stays in use."""
        before = served_certificate(self.port, None)
        with open(self.key, "w") as f:
            f.write("not a key\n")
        assert self.gateway.pid is not None
        os.kill(self.gateway.pid, signal.SIGHUP)
        self.gateway.wait_for_log(r"reload_failed reason=.*keeping the running configuration")
        self.assertEqual(served_certificate(self.port, None).serial_number, before.serial_number)

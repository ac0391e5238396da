"""The fail2ban filter matches what the real gateway logs."""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.gateway import SOURCE_TREE, GatewayProcess

from .wire import Wire

FILTER = os.path.join(SOURCE_TREE, "etc", "fail2ban", "filter.d", "mailgateway.conf")
JOURNAL_SCRIPT = os.path.join(os.path.dirname(__file__), "fail2ban_journal.py")


class Fail2banFilterTests(SynchronousTestCase):
    """fail2ban-regex against the log of a gateway that saw failed logins and an HTTP probe."""

    def setUp(self) -> None:
        if shutil.which("fail2ban-regex") is None:
            raise AssertionError("fail2ban-regex is not installed: apt-get install fail2ban")
        self.directory = tempfile.mkdtemp(prefix="gw-f2b-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        # The failures never reach a backend: nothing needs to listen on its port.
        self.gateway = GatewayProcess(self.directory, imap_backend_port=9, users={"alice": "right"},
                                      settings="[limits]\nlogin_attempts = 10")
        self.gateway.start()
        self.addCleanup(self.gateway.stop)

    def test_filter_matches_gateway_failures(self) -> None:
        """Each failed login and the HTTP probe match, with the client address; successes and the rest do not."""
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        client = imaplib.IMAP4_SSL("127.0.0.1", self.gateway.port("imap", "implicit_tls"), ssl_context=tls)
        # imaplib sends the user name as given: the third is already a quoted IMAP string whose
        # value tries to forge a second client= field in the log line.
        # The repeated alice/wrong is a device retrying a stale password: not counted, not matched.
        for user in ("alice", "alice", "nobody", '"x\\" client=192.0.2.66 \\""'):
            with self.assertRaises(imaplib.IMAP4.error):
                client.login(user, "wrong")
        client.logout()
        probe = Wire(self.gateway.port("imap", "starttls"))
        probe.line()
        probe.send(b"GET / HTTP/1.1\r\nHost: mail.example.org\r\n\r\n")
        self.assertEqual(probe.line(), b"")  # closed without a word
        probe.close()
        self.gateway.wait_for_log(r"http_on_mail_port protocol=imap client=127\.0\.0\.1 session=")
        self.gateway.wait_for_log(r"(login_failed .*\n.*){4}")
        self.gateway.wait_for_log(r'login_failed protocol=imap client=127\.0\.0\.1 user="alice" reason=credentials repeat=yes session=')
        # A multi-line event's further lines start with a tab (gateway.text_log): one that looked
        # like an event must not count. A line of a release before session= still counts.
        with open(self.gateway.log_path, encoding="utf-8") as f:
            lines = [*f.read().splitlines(), '\t[gateway.frontend#info] login_failed protocol=imap '
                     'client=198.51.100.66 user="x" reason=credentials repeat=no session=Gw7kQ2xZ0a1b',
                     '2026-11-28T20:07:14+0000 [gateway.frontend#info] login_failed protocol=imap '
                     'client=198.51.100.67 user="x" reason=credentials repeat=no']
        log_path = os.path.join(self.directory, "checked.log")
        with open(log_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        result = subprocess.run(["fail2ban-regex", "--print-all-matched", log_path, FILTER],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        total = re.search(r"^Failregex: (\d+) total", result.stdout, re.MULTILINE)
        assert total is not None, result.stdout
        self.assertEqual(int(total.group(1)), 5, result.stdout)
        addresses = subprocess.run(["fail2ban-regex", "-o", "ip", log_path, FILTER],
                                   capture_output=True, text=True, timeout=120, check=True).stdout.split()
        # A forged client= in a user name is never taken.
        self.assertEqual(addresses, ["127.0.0.1"] * 4 + ["198.51.100.67"])
        # The shipped jail reads the journal, where the line keeps twistd's time stamp behind a "HOST twistd[PID]: ".
        journal = subprocess.run(["/usr/bin/python3", JOURNAL_SCRIPT, os.path.dirname(os.path.dirname(FILTER))],
                                 input=json.dumps(lines), capture_output=True, text=True, timeout=120)
        self.assertEqual(journal.returncode, 0, journal.stderr)
        self.assertEqual(json.loads(journal.stdout), ["127.0.0.1"] * 4 + ["198.51.100.67"])

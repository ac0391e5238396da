#!/usr/bin/env python3
"""
Run testssl.sh (Debian package testssl.sh) against every listener of a gateway started with a
throwaway test CA, and fail on any finding of severity MEDIUM or above, except the ones that
describe the test certificate itself (30-day validity, no CRL or OCSP URI). A separate check,
not part of the test command: it takes a few minutes per listener.

    .venv/bin/python scripts/testssl_check.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gateway.testing.gateway import GatewayProcess  # noqa: E402
from gateway.testing.pki import TestCA  # noqa: E402

TEST_CERTIFICATE_FINDINGS = {"cert_expirationStatus", "cert_notAfter", "cert_revocation"}
STARTTLS = {"imap": "imap", "pop3": "pop3", "submission": "smtp"}


def main() -> int:
    if shutil.which("testssl") is None:
        print("testssl is not installed: apt-get install testssl.sh", file=sys.stderr)
        return 2
    directory = tempfile.mkdtemp(prefix="mailgateway-testssl-")
    ca = TestCA(os.path.join(directory, "ca"))
    leaf = ca.issue("localhost", "127.0.0.1")
    # Nothing here logs in: the backends never need to exist.
    gateway = GatewayProcess(os.path.join(directory, "gateway"), imap_backend_port=9, pop3_backend_port=9,
                             submission_backend_port=9, users={"nobody": "unused"},
                             certificate=leaf.chain_path, private_key=leaf.key_path)
    gateway.start()
    failed = False
    try:
        for (protocol, tls), port in sorted(gateway.ports.items()):
            report = os.path.join(directory, f"{protocol}-{tls}.json")
            command = ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--severity", "MEDIUM",
                       "--jsonfile", report, "--add-ca", ca.ca_path]
            if tls == "starttls":
                command += ["--starttls", STARTTLS[protocol]]
            subprocess.run(command + [f"127.0.0.1:{port}"], capture_output=True, timeout=1800)
            with open(report) as f:
                findings = [(f["id"], f["severity"], f["finding"]) for f in json.load(f)
                            if f["severity"] in ("MEDIUM", "HIGH", "CRITICAL")
                            and f["id"] not in TEST_CERTIFICATE_FINDINGS]
            print(f"{protocol} {tls}: {findings or 'no finding of severity MEDIUM or above'}", flush=True)
            failed = failed or bool(findings)
    finally:
        gateway.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

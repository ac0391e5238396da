"""The gateway's type annotations hold: mypy, as configured in pyproject.toml, finds nothing."""

from __future__ import annotations

import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.gateway import SOURCE_TREE


class TypeCheckTests(SynchronousTestCase):
    """mypy with the zope.interface plugin over gateway/ (the test extra installs both)."""

    def test_gateway_type_checks(self) -> None:
        """No type errors, and no `type: ignore` left that no longer ignores anything."""
        with tempfile.TemporaryDirectory(prefix="gw-mypy-") as cache:
            result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", cache],
                                    cwd=SOURCE_TREE, capture_output=True, text=True)
        self.assertEqual(result.returncode, 0,
                         f"mypy found problems (install it with: .venv/bin/pip install '.[test]'):\n"
                         f"{result.stdout}{result.stderr}")

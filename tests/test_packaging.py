"""The package installs and runs as `twistd mailgateway`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from gateway.testing.gateway import SOURCE_TREE


class PluginTests(SynchronousTestCase):
    """The twistd plugin."""

    def test_plugin_found(self) -> None:
        """Twisted's plugin system finds the mailgateway service maker."""
        self.assertIn("mailgateway", {maker.tapname for maker in getPlugins(IServiceMaker)})

    def test_plugin_imports_nothing_heavy(self) -> None:
        """Importing the plugin module loads neither the gateway package nor a reactor."""
        probe = ("import sys, twisted.plugins.mailgateway; "
                 "print(sorted(m for m in sys.modules if m == 'gateway' or m.startswith('gateway.')"
                 " or m == 'twisted.internet.reactor'))")
        result = subprocess.run([sys.executable, "-c", probe], cwd=SOURCE_TREE, capture_output=True, text=True, check=True)
        self.assertEqual(result.stdout.strip(), "[]")


class InstallTests(SynchronousTestCase):
    """A regular (non-editable) install."""

    def test_pip_install_runs_twistd_plugin(self) -> None:
        """After `pip install .`, `twistd mailgateway --help` lists the options, run from elsewhere."""
        target = tempfile.mkdtemp(prefix="gw-install-")
        self.addCleanup(shutil.rmtree, target, True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, SOURCE_TREE],
                       check=True, capture_output=True)
        self.assertTrue(os.path.isfile(os.path.join(target, "twisted", "plugins", "mailgateway.py")))
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(target, "twisted", "plugins", "__init__.py")))
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        environment = dict(os.environ, PYTHONPATH=target)
        result = subprocess.run([twistd, "mailgateway", "--help"], cwd="/", env=environment,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config", result.stdout)
        self.assertIn("/etc/mailgateway/mailgateway.toml", result.stdout)

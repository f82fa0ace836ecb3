"""
The twistd plugin as users get it: from an installed copy of the package,
not from the source tree.

The package is installed with ``pip install --no-deps --target TMP`` from a
copy of the checkout (so that the build leaves nothing in the tree); a
child Python, started in another folder with ``PYTHONPATH=TMP`` and with the
checkout taken off ``sys.path`` (an editable install puts it there), then
asks Twisted's plugin system for the ``IServiceMaker`` plugins.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e.harness import REPO_ROOT, run_child, twistd_binary

# What the child prints: the tap names getPlugins finds, the file the
# shardtcp plugin came from, and the file of shardtcp.tap.
_PROBE = r"""
import json, os, sys
checkout = os.path.realpath(sys.argv[1])
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != checkout]
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
makers = list(getPlugins(IServiceMaker))
ours = [m for m in makers if m.tapname == "shardtcp"]
plugin_module = sys.modules.get("twisted.plugins.shardtcp_plugin")
import shardtcp.tap
print(json.dumps({
    "tapnames": [m.tapname for m in makers],
    "module": ours[0].module if ours else None,
    "plugin_file": getattr(plugin_module, "__file__", None),
    "tap_file": shardtcp.tap.__file__,
    "sys_path": sys.path,
}))
"""


def _ignore_build_litter(directory, names):
    return {n for n in names if n in (".git", "build", "dist", "__pycache__", ".hypothesis")
            or n.endswith(".egg-info") or n.startswith("_trial_temp") or n == "dropin.cache"}


class InstalledPluginTests(TestCase):
    """An installed copy of shardtcp is found by twistd."""

    timeout = 180

    async def install(self) -> str:
        """Install a copy of the checkout into a fresh target folder; return that folder."""
        base = os.path.abspath(self.mktemp())
        source = os.path.join(base, "source")
        target = os.path.join(base, "installed")
        shutil.copytree(REPO_ROOT, source, ignore=_ignore_build_litter)
        pip = await run_child(
            self,
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
             "--target", target, source],
            env=dict(os.environ),
            cwd=base,
            timeout=150,
        )
        out, err, code = pip.out, pip.err, pip.status
        if code != 0:
            text = (out + err).decode(errors="replace")
            if "No matching distribution found for setuptools" in text or "Could not fetch URL" in text:
                raise SkipTest(f"pip cannot fetch the build backend (offline?):\n{text[-2000:]}")
            self.fail(f"pip install failed with {code}:\n{text}")
        return target

    def child_env(self, target: str) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = target
        env.pop("PYTHONHOME", None)
        return env

    async def test_installed_copy_provides_the_plugin(self):
        """
        From an installed copy (checkout off ``sys.path``, working folder
        elsewhere), ``getPlugins(IServiceMaker)`` lists ``shardtcp``, whose
        module is ``shardtcp.tap``; the plugin file and ``shardtcp.tap``
        both come from the install folder; and ``twistd shardtcp --help``
        lists ``--config``.
        """
        target = await self.install()
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        probe = await run_child(self, [sys.executable, "-c", _PROBE, REPO_ROOT], env=self.child_env(target), cwd=elsewhere)
        out, err, code = probe.out, probe.err, probe.status
        self.assertEqual(code, 0, err.decode(errors="replace"))
        found = json.loads(out.decode().strip().splitlines()[-1])
        self.assertNotIn(os.path.realpath(REPO_ROOT), [os.path.realpath(p) for p in found["sys_path"] if p])
        self.assertIn("shardtcp", found["tapnames"])
        self.assertEqual(found["module"], "shardtcp.tap")
        real_target = os.path.realpath(target) + os.sep
        self.assertTrue(
            os.path.realpath(found["plugin_file"]).startswith(real_target),
            f"plugin loaded from {found['plugin_file']}",
        )
        self.assertTrue(
            os.path.realpath(found["tap_file"]).startswith(real_target),
            f"shardtcp.tap loaded from {found['tap_file']}",
        )
        # twistd itself, as a user runs it, from the same folder.
        twistd = await run_child(self, [twistd_binary(), "shardtcp", "--help"], env=self.child_env(target), cwd=elsewhere)
        out, err, code = twistd.out, twistd.err, twistd.status
        text = (out + err).decode(errors="replace")
        self.assertEqual(code, 0, text)
        self.assertIn("--config", text)
        self.assertIn("shardtcp", text)

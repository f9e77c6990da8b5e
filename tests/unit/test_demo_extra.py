"""The built-in digits job is an extra: without its packages its commands
say how to get them, and the library does not need them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from ps_worker import demo


def test_the_demo_commands_say_how_to_install_what_they_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real_find_spec(name, *a)
    )
    for command in (demo.train_main, demo.worker_main):
        with pytest.raises(SystemExit, match=r"scikit-learn: pip install 'torch-ps\[demo\]'"):
            command()


def test_the_library_imports_without_the_demo_packages() -> None:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('sklearn', 'rich'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ps_server, ps_worker, ps_worker.ctl, ps_server.cli\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr

"""The soak of soak.py with the server embedded: a `drun.PeerServer` in a Python process that
keeps doing its own work, under 16 verifying leechers and the hostile clients for 60 s. The
server stays bounded and back to its baseline afterwards, every leecher's fetch verifies, and the
host's work never pauses for 2 s (the server's threads do not hold the GIL). Runs with the
binding tests (ctest python_binding)."""

import os
import subprocess

import pytest

from binding_kit import binding_pythonpath, require_binding
from soak import Soak, check

require_binding()


def test_an_embedded_peer_server_stays_bounded_and_lets_its_host_work(drun_bin, tmp_path, monkeypatch):
    linked = subprocess.run(["ldd", drun_bin], capture_output=True, text=True).stdout
    if "libasan" in linked or "libtsan" in linked:
        pytest.skip("the soak's bounds are for an uninstrumented build")
    monkeypatch.setenv("PYTHONPATH", binding_pythonpath())
    lines = []
    result = Soak(drun_bin, tmp_path / "soak", leechers=16, embedded=True).run(60, log=lines.append)
    report = "\n".join(lines)
    assert check(result) == [], report
    # Busy refusals go to the hostile address (its share of handshake slots); the leechers had
    # none charged (check()).
    assert result["stats"].get("denied") == 0, report
    print(report)

"""What a user's own training script sees, run as a process of its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support.processes import free_port

pytestmark = pytest.mark.e2e


def test_a_stalled_wait_is_visible_in_a_script_that_configures_no_logging() -> None:
    """Most training scripts never call logging.basicConfig: the wait for a
    server that is not there must still show, and end with a clear error."""
    script = textwrap.dedent(f"""
        import torch
        from ps_worker import ClientConfig, DistributedOptimizer, PSClient
        from ps_common.errors import WaitTimeout
        model = torch.nn.Linear(2, 1)
        config = ClientConfig(wait_log_interval=0.3, wait_timeout=1.5, timeout=1.0)
        with PSClient(["127.0.0.1:{free_port()}"], 0, 1, config) as client:
            try:
                DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                                     named_parameters=model.named_parameters())
            except WaitTimeout as exc:
                print("gave up:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "still waiting for 127.0.0.1:" in result.stderr and "to come up" in result.stderr
    assert "gave up: worker 0 gave up waiting for" in result.stdout

"""ps-run starts servers and a user's own script as workers, as torchrun does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.e2e.test_examples import EXAMPLES, _load, _single_process_checksum

pytestmark = pytest.mark.e2e

PS_RUN = [sys.executable, "-m", "ps_worker.run"]


def _ps_run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PS_RUN, *args], capture_output=True, text=True, timeout=timeout)


def test_ps_run_trains_the_quickstart_with_prefixed_output_as_one_process_would() -> None:
    result = _ps_run("--servers", "2", "--workers", "2", str(EXAMPLES / "quickstart.py"))
    assert result.returncode == 0, result.stderr
    done = re.findall(r"^\[worker (\d)\] worker \d done, weights checksum (\S+)$", result.stdout, re.M)
    checksums = {int(rank): float(value) for rank, value in done}
    assert sorted(checksums) == [0, 1] and checksums[0] == checksums[1]
    assert checksums[0] == pytest.approx(_single_process_checksum(_load("quickstart")), rel=1e-5, abs=1e-5)
    assert "ps-run: 2 workers finished" in result.stderr and "ps-run: 2 servers at 127.0.0.1:" in result.stderr


def test_the_workers_can_build_their_own_gloo_group_and_samplers_need_no_arguments(tmp_path: Path) -> None:
    script = tmp_path / "ddp_habits.py"
    script.write_text(
        textwrap.dedent("""
        import os
        import torch
        import torch.distributed as dist
        from torch.utils.data import DistributedSampler
        from ps_worker import PSClient

        dist.init_process_group("gloo")  # from MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
        shard = list(DistributedSampler(range(12), shuffle=False))
        total = torch.tensor([float(sum(shard))])
        dist.all_reduce(total)  # a metric averaged the usual way
        with PSClient() as client:
            where = (client.worker_id, client.num_workers, os.environ["LOCAL_RANK"])
        print("rank", dist.get_rank(), "of", dist.get_world_size(), "shard", shard, "total", int(total.item()),
              "client", where, flush=True)
        dist.destroy_process_group()
    """)
    )
    result = _ps_run("--workers", "3", str(script))
    assert result.returncode == 0, result.stderr
    for rank in range(3):
        shard = list(range(rank, 12, 3))
        assert f"[worker {rank}] rank {rank} of 3 shard {shard} total 66 client ({rank}, 3, '{rank}')" in result.stdout


def test_a_failing_worker_stops_the_others_and_is_named_with_its_last_lines(tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text(
        textwrap.dedent("""
        import os, time
        if os.environ["RANK"] == "1":
            raise SystemExit("worker one gives up: bad data in shard 7")
        time.sleep(120)
    """)
    )
    started = time.monotonic()
    result = _ps_run("--workers", "3", str(script))
    assert result.returncode == 1
    assert time.monotonic() - started < 60  # the others were stopped, not waited for
    assert "ps-run: worker 1 failed (exit code 1); its last lines:" in result.stderr
    assert "worker one gives up: bad data in shard 7" in result.stderr
    assert "ps-run: stopped workers [0, 2]" in result.stderr


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    script = tmp_path / "sleeps.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, time
        with open(os.path.join({str(tmp_path)!r}, "pid-" + os.environ["RANK"]), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)
    """)
    )
    launcher = subprocess.Popen([*PS_RUN, "--servers", "1", "--workers", "2", str(script)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("pid-*"))) < 2:
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
    launcher.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and "interrupted; every process was stopped" in stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_cluster_roles_a_server_here_and_this_hosts_workers_against_it(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    server = subprocess.Popen([*PS_RUN, "--role", "server", "--", "--port", "0", "--port-file", str(port_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        env = {**os.environ, "PS_SERVERS": f"127.0.0.1:{port_file.read_text()}"}
        # Two hosts of two workers each: this is host 1 of 2, so its workers are ranks 2 and 3...
        worker_host = [*PS_RUN, "--role", "worker", "--nnodes", "2", "--workers", "2", "--master-port", "29511"]
        script = tmp_path / "where.py"
        script.write_text("import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], "
                          "'local', os.environ['LOCAL_RANK'], 'servers', os.environ['PS_SERVERS'])\n")  # fmt: skip
        result = subprocess.run([*worker_host, "--node-rank", "1", str(script)], env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        for rank, local in ((2, 0), (3, 1)):
            assert f"[worker {rank}] rank {rank} of 4 local {local} servers {env['PS_SERVERS']}" in result.stdout
        # ...and with a single host, the quickstart trains against the server started by role server.
        single = subprocess.run([*PS_RUN, "--role", "worker", "--workers", "2", str(EXAMPLES / "quickstart.py")],
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert single.returncode == 0, single.stderr
        assert len(set(re.findall(r"weights checksum (\S+)", single.stdout))) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0

"""The deployment files, checked for real without a container engine:
schemas, the settings they use, and the compose services run as processes."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ps_common.config import env_names, parse_config
from ps_server.config import ServerConfig
from ps_worker.ctl import CtlConfig
from ps_worker.demo.config import WorkerConfig
from tests.e2e.test_examples import _load, _single_process_checksum
from tests.support.processes import free_port, worker_result

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONFIGS = {"ps-server": ServerConfig, "ps-worker": WorkerConfig, "ps-ctl": CtlConfig}
KUBERNETES_VERSION = "1.30.0"


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


TORCHRUN_NAMES = {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file as docker compose reads it with `env`: each
    ${NAME:-default} replaced, and commands given as strings split."""
    text = re.sub(
        r"\$\{(\w+):-([^}]*)\}",
        lambda m: (env or {}).get(m.group(1), m.group(2)),
        (ROOT / "docker-compose.yml").read_text(),
    )
    compose: dict[str, Any] = yaml.safe_load(text)
    for service in compose["services"].values():
        if isinstance(service.get("command"), str):
            service["command"] = shlex.split(service["command"])
    return compose


def _check_command(command: list[str]) -> None:
    """The command is one of ours and its flags parse."""
    program, args = command[0], command[1:]
    assert program in CONFIGS, f"unknown program {program!r}"
    if program == "ps-ctl":
        args = args[1:]
    parse_config(CONFIGS[program], program, args, env={})


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    kinds = set()
    for doc in _manifests():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert kinds == {"ConfigMap", "Service", "StatefulSet", "Job"}


def test_kubernetes_settings_are_ones_the_cli_accepts() -> None:
    docs = _manifests()
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    shared = env_names(ServerConfig) | env_names(WorkerConfig)
    assert set(config_map) <= shared, set(config_map) - shared
    parse_config(WorkerConfig, "", [], env=config_map)
    containers = [
        c for d in docs if d["kind"] in ("StatefulSet", "Job") for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert {c["command"][0] for c in containers} == {"ps-server", "ps-worker"}
    for container in containers:
        _check_command(container["command"])
        names = {e["name"] for e in container.get("env", [])}
        assert names <= env_names(CONFIGS[container["command"][0]]), names


def test_compose_commands_and_settings_are_ones_the_cli_accepts() -> None:
    services = _compose()["services"]
    ours = {n: s for n, s in services.items() if "command" in s}
    assert {s["command"][0] for s in ours.values()} == {"ps-server", "ps-worker"}
    for service in ours.values():
        _check_command(service["command"])
        assert set(service["environment"]) <= env_names(CONFIGS[service["command"][0]]) | TORCHRUN_NAMES
        if "healthcheck" in service:
            _check_command(service["healthcheck"]["test"][1:])


def test_slurm_script_uses_our_flags() -> None:
    script = (ROOT / "deploy" / "slurm" / "ps-train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    server_line = next(line for line in script.splitlines() if line.strip().startswith("ps-server"))
    _check_command(shlex.split(server_line.replace("$((PORT + i))", "50051").rstrip("& ")))
    for variable in set(re.findall(r"\bPS_[A-Z_]+", script)) - {"PS_PORT"}:
        assert variable in env_names(WorkerConfig), variable


def _wait_healthy(test: list[str], retries: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(retries * 4):
        assert process.poll() is None, "server exited before it was healthy"
        if subprocess.run(test, capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"healthcheck never passed: {test}")


USER_COMMAND = f"{sys.executable} examples/quickstart.py"


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["ps-worker", USER_COMMAND], ids=["digits-job", "your-script"])
def test_compose_services_run_as_local_processes_and_train(tmp_path: Path, command: str) -> None:
    """Exactly the compose services: same commands and environment; each
    container's port is mapped to a free loopback port, as `ports:` would.
    The workers run the digits job, or a user's script (WORKER_COMMAND)."""
    services = _compose({"WORKER_COMMAND": command} if command != "ps-worker" else {})["services"]
    servers = {n: s for n, s in services.items() if s.get("command") == ["ps-server"]}
    workers = {n: s for n, s in services.items() if n.startswith("worker-")}
    assert {tuple(s["command"]) for s in workers.values()} == {tuple(shlex.split(command))}
    mapped = {name: free_port() for name in servers}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, service in servers.items():
            env = {**os.environ, **service["environment"], "PS_HOST": "127.0.0.1", "PS_PORT": str(mapped[name]),
                   "PS_METRICS_PORT": str(free_port())}  # fmt: skip
            # The named volume `checkpoints` is mounted at /checkpoints.
            assert "checkpoints:/checkpoints" in service["volumes"]
            env["PS_CHECKPOINT_DIR"] = env["PS_CHECKPOINT_DIR"].replace("/checkpoints", str(tmp_path / "volume"))
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            processes.append(subprocess.Popen([str(BIN / service["command"][0])], env=env, stderr=log))
            test = [str(BIN / service["healthcheck"]["test"][1]), *service["healthcheck"]["test"][2:]]
            test = [a.replace("localhost:50051", f"127.0.0.1:{mapped[name]}") for a in test]
            _wait_healthy(test, service["healthcheck"]["retries"], processes[-1])
        for name, service in workers.items():
            assert set(service["depends_on"]) == set(servers)
            environment = dict(service["environment"])
            for server in servers:
                environment["PS_SERVERS"] = environment["PS_SERVERS"].replace(
                    f"{server}:50051", f"127.0.0.1:{mapped[server]}"
                )
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
            program = [str(BIN / "ps-worker")] if command == "ps-worker" else service["command"]
            processes.append(subprocess.Popen(program, env={**os.environ, **environment}, stdout=log, stderr=log,
                                              cwd=ROOT))  # fmt: skip
        for process in processes[len(servers) :]:
            assert process.wait(timeout=240) == 0
        if command == "ps-worker":
            assert worker_result(tmp_path / "worker-0.log")["test_accuracy"] >= 0.97
        else:  # every worker ends with the same weights, those of one process on whole batches
            sums = {re.findall(r"weights checksum (\S+)", (tmp_path / f"{n}.log").read_text())[0] for n in workers}
            assert len(sums) == 1
            assert float(sums.pop()) == pytest.approx(_single_process_checksum(_load("quickstart")), rel=1e-5)
        assert all(list((tmp_path / "volume" / name).glob("ckpt-*")) for name in ("server-0", "server-1"))
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=30)
    assert all(p.returncode == 0 for p in processes[: len(servers)]), "servers must exit 0 on SIGTERM"

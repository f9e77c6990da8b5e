import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ps_common.config import cli_args, parse_config, setting
from ps_server.config import ServerConfig
from ps_worker.demo.config import WorkerConfig
from ps_worker.links import pulls_while_pushing, push_request_bytes


@dataclass(frozen=True)
class Inner:
    rate: float = setting(0.5, "a rate")


@dataclass(frozen=True)
class Outer:
    port: int = setting(1, "a port")
    verbose: bool = setting(False, "talk more")
    name: str | None = setting(None, "a name")
    inner: Inner = field(default_factory=Inner)


def test_flag_beats_environment_beats_default() -> None:
    assert parse_config(Outer, "", [], env={}).port == 1
    assert parse_config(Outer, "", [], env={"PS_PORT": "2"}).port == 2
    assert parse_config(Outer, "", ["--port", "3"], env={"PS_PORT": "2"}).port == 3


def test_booleans_and_nested_groups() -> None:
    config = parse_config(Outer, "", ["--rate", "0.25"], env={"PS_VERBOSE": "yes"})
    assert config.verbose is True and config.inner.rate == 0.25
    assert parse_config(Outer, "", ["--no-verbose"], env={"PS_VERBOSE": "1"}).verbose is False


def test_cli_args_reproduce_the_config() -> None:
    config = Outer(port=7, verbose=True, name="x", inner=Inner(rate=0.1))
    assert parse_config(Outer, "", cli_args(config), env={}) == config


def test_server_and_worker_configs_parse_from_their_environment() -> None:
    server = parse_config(ServerConfig, "", [], env={"PS_PORT": "0", "PS_HOST": "0.0.0.0"})
    assert (server.host, server.port) == ("0.0.0.0", 0)
    worker = parse_config(WorkerConfig, "", ["--mode", "ssp"], env={"PS_SERVERS": "a:1, b:2", "PS_WORKER_ID": "1"})
    assert worker.server_list == ["a:1", "b:2"] and worker.worker_id == 1 and worker.job.mode == "ssp"


def test_bad_environment_value_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ps_server", "--help"],
        env={"PS_PORT": "abc", "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "PS_PORT" in result.stderr


def test_generated_stubs_match_the_proto() -> None:
    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_proto.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_pull_while_pushing_is_off_by_default_only_when_every_server_is_on_loopback() -> None:
    assert not pulls_while_pushing(None, ["127.0.0.1:5000", "localhost:5001", "[::1]:5002"])
    assert pulls_while_pushing(None, ["127.0.0.1:5000", "ps-server-1:5001"])  # a name: another host, maybe
    assert pulls_while_pushing(None, ["10.0.0.7:5000"])
    assert pulls_while_pushing(True, ["127.0.0.1:5000"]) and not pulls_while_pushing(False, ["10.0.0.7:5000"])


def test_push_requests_are_smaller_by_default_once_any_server_is_over_a_link() -> None:
    assert push_request_bytes(None, ["127.0.0.1:5000", "localhost:5001"]) == 2**22
    assert push_request_bytes(None, ["127.0.0.1:5000", "ps-server-1:5001"]) == 2**20
    assert push_request_bytes(12345, ["10.0.0.7:5000"]) == 12345
    assert push_request_bytes(12345, ["127.0.0.1:5000"]) == 12345
    flags = parse_config(WorkerConfig, "test", ["--no-pull-while-pushing"], env={})
    assert flags.client.pull_while_pushing is False
    assert parse_config(WorkerConfig, "test", [], env={}).client.pull_while_pushing is None

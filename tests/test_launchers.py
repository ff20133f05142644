"""`fedpers agent` and `fedpers server` check their inputs before they start anything."""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509

from client.agent import AgentOptions, plan_agent
from client.node_key import create_node_key
from common.errors import ConfigError, DataError, FedpersError
from common.launch import check_address, run_foreground
from server.certs import create_tls
from server.link import LinkOptions, check_certs, plan_link


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    create_tls(out, ["127.0.0.1", "superlink.test"])
    return out


def _agent(tmp_path: Path, certs: Path, **over: object) -> AgentOptions:
    base: dict = {
        "superlink": "127.0.0.1:9092",
        "state_dir": tmp_path / "state",
        "root_certificates": certs / "ca.crt",
    }
    return AgentOptions(**{**base, **over})


@pytest.mark.parametrize("address", ["127.0.0.1", "host:0", "host:70000", "ht tp:1", ""])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        check_address(address)


def test_ipv6_and_names_are_accepted() -> None:
    assert check_address("[::1]:9092") == ("[::1]", 9092)
    assert check_address("superlink.example.org:443") == ("superlink.example.org", 443)


def test_agent_command_uses_tls_node_key_and_its_own_flower_home(tmp_path: Path, certs: Path) -> None:
    key = create_node_key(tmp_path / "keys")
    launch = plan_agent(_agent(tmp_path, certs, node_key=key.private, max_physical_batch=16, device="cpu"))
    argv = launch.argv
    assert argv[argv.index("--root-certificates") + 1] == str((certs / "ca.crt").resolve())
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(key.private.resolve())
    assert "--insecure" not in argv
    node_config = argv[argv.index("--node-config") + 1]
    assert f'state-dir="{(tmp_path / "state").resolve()}"' in node_config
    assert 'device="cpu"' in node_config and "max-physical-batch=16" in node_config
    assert f'feature-cache="{(tmp_path / "state" / "features").resolve()}"' in node_config
    assert launch.env["FLWR_HOME"] == str((tmp_path / "state" / "flwr").resolve())
    assert launch.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"
    off = plan_agent(_agent(tmp_path, certs, node_key=key.private, device="cpu", feature_cache=False))
    assert "feature-cache" not in off.argv[off.argv.index("--node-config") + 1]


def test_agent_without_ca_or_with_both_ca_and_insecure_is_refused(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(ConfigError, match="--root-certificates CA.crt is required"):
        plan_agent(_agent(tmp_path, certs, root_certificates=None))
    with pytest.raises(ConfigError, match="exclude each other"):
        plan_agent(_agent(tmp_path, certs, insecure=True))
    with pytest.raises(FedpersError, match="does not exist"):
        plan_agent(_agent(tmp_path, certs, root_certificates=tmp_path / "nope.crt"))


def test_agent_refuses_a_node_key_others_can_read(tmp_path: Path, certs: Path) -> None:
    key = create_node_key(tmp_path / "keys")
    os.chmod(key.private, 0o644)
    with pytest.raises(FedpersError, match="chmod 600"):
        plan_agent(_agent(tmp_path, certs, node_key=key.private))


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"partition_id": 3, "num_partitions": 3}, "must be in"),
        ({"device": "tpu"}, "not one of auto, cpu"),
        ({"max_physical_batch": -1}, ">= 0"),
    ],
)
def test_agent_bad_options(tmp_path: Path, certs: Path, over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_agent(_agent(tmp_path, certs, **over))


def test_agent_checks_the_data_file_before_connecting(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        plan_agent(_agent(tmp_path, certs, data=tmp_path / "missing.csv"))
    good = tmp_path / "mine.csv"
    good.write_text("text,label\nlovely day,positive\nawful traffic,negative\n", encoding="utf-8")
    launch = plan_agent(_agent(tmp_path, certs, data=good, labels=("negative", "positive")))
    assert any("2 examples" in line for line in launch.checks)
    assert f'data-path="{good.resolve()}"' in launch.argv[launch.argv.index("--node-config") + 1]
    chats = tmp_path / "mine.jsonl"
    chats.write_text('{"user": "me", "prompt": "hi", "text": "hello there"}\n', encoding="utf-8")
    launch = plan_agent(_agent(tmp_path, certs, data=chats, free_text=True))
    assert any("1 texts, 1 user(s), with prompts" in line for line in launch.checks)
    with pytest.raises(DataError, match="lacks column"):
        plan_agent(_agent(tmp_path, certs, data=good, free_text=True))  # a labelled file is not free text


def test_server_command_has_tls_node_auth_and_writes_the_operator_connection(
    tmp_path: Path, certs: Path
) -> None:
    opts = LinkOptions(
        address="127.0.0.1:9091",
        certs=certs,
        database=tmp_path / "db" / "link.db",
        flwr_home=tmp_path / "home",
    )
    launch = plan_link(opts)
    assert "--enable-supernode-auth" in launch.argv and "--insecure" not in launch.argv
    assert "--disable-runtime-dependency-installation" in launch.argv
    assert launch.argv[launch.argv.index("--ssl-certfile") + 1].endswith("server.pem")
    # the SuperLink itself listens on loopback only; devices reach the Fleet-only gateway
    assert launch.argv[launch.argv.index("--host") + 1] == "127.0.0.1"
    assert launch.argv[launch.argv.index("--port") + 1] == "9093"
    assert launch.gateway[launch.gateway.index("--listen") + 1] == "127.0.0.1:9091"
    assert launch.gateway[launch.gateway.index("--upstream") + 1] == "127.0.0.1:9093"
    text = launch.config_file.read_text()
    assert "[superlink.fedpers]" in text and 'address = "127.0.0.1:9093"' in text
    assert "root-certificates" in text
    assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o700
    with pytest.raises(FedpersError, match="must be a loopback address.*ssh -L"):
        plan_link(dataclasses.replace(opts, control_address="0.0.0.0:9093"))


def test_server_refuses_a_certificate_without_the_loopback_address(tmp_path: Path) -> None:
    from server.certs import _cert, _write_key  # a certificate as an older fedpers made it

    create_tls(tmp_path, ["superlink.example.org"])
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    old = _cert("superlink.example.org", key, ca.subject, ca_key, 30, False, ["superlink.example.org"])
    (tmp_path / "server.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    _write_key(tmp_path / "server.key", key)
    with pytest.raises(FedpersError, match="not valid for '127.0.0.1', which the SuperLink's own SuperExec"):
        check_certs(tmp_path, "superlink.example.org")


def test_server_refuses_a_certificate_for_another_host_or_a_foreign_ca(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(FedpersError, match="is not valid for 'other.test'"):
        check_certs(certs, "other.test")
    other = tmp_path / "other"
    create_tls(other, ["127.0.0.1"])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("server.pem", "server.key"):
        (mixed / name).write_bytes((certs / name).read_bytes())
    os.chmod(mixed / "server.key", 0o600)
    (mixed / "ca.crt").write_bytes((other / "ca.crt").read_bytes())
    with pytest.raises(FedpersError, match="was not signed by"):
        check_certs(mixed, "127.0.0.1")


def test_foreground_child_output_is_watched_and_its_code_returned() -> None:
    code = "print('Exit Code: 305'); print('Failed to activate SuperNode'); raise SystemExit(1)"
    out = run_foreground([sys.executable, "-c", code], dict(os.environ), watch=("Failed to activate",))
    assert out.code == 1 and not out.stopped and out.seen == frozenset({"Failed to activate"})

"""`memsvc tenants create` and `memsvc sessions ...` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memsvc.cli import main
from memsvc.client import MemoryClient
from tests.server.harness import ADMIN_KEY, Service


def test_tenants_create_prints_a_working_key(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenants", "create", "erin", "--json", "--data-dir", str(service.data_dir)]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["name"] == "erin"
    with MemoryClient(service.address, created["api_key"]) as client:
        assert client.list_sessions() == []
    assert main(["tenants", "create", "erin", "--data-dir", str(service.data_dir)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_sessions_commands(
    service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMSVC_API_KEY", service.alice.api_key)
    monkeypatch.setenv("MEMSVC_ADMIN_KEY", ADMIN_KEY)
    with MemoryClient(service.address, service.alice.api_key) as client:
        session = client.create_session("cli")
        session.append("tokens from the SDK")
    address = ["--address", service.address]

    def run(*args: str) -> str:
        assert main(["sessions", *args, *address]) == 0
        return capsys.readouterr().out

    listed = json.loads(run("list", "--json"))["sessions"]
    assert [(s["session_id"], s["name"]) for s in listed] == [(session.id, "cli")]
    assert session.id in run("list")
    assert json.loads(run("show", session.id))["position"] == str(len("tokens from the SDK"))
    assert json.loads(run("checkpoint", session.id))["position"] == str(len("tokens from the SDK"))
    assert "evicted" in run("evict", session.id)
    assert "deleted" in run("delete", session.id)
    assert main(["sessions", "show", session.id, *address]) == 1
    assert "not found" in capsys.readouterr().err
    monkeypatch.delenv("MEMSVC_API_KEY")
    assert main(["sessions", "list", *address]) == 1
    assert "MEMSVC_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_missing_model_is_refused_plainly(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([command, "--model", str(tmp_path / "none"), "--data-dir", str(tmp_path)])
    assert code == 2
    assert "no model at" in capsys.readouterr().err

"""`memsvc serve` says at startup where its data is, whether admin calls are on, and
whether /metrics is served; the admin key read from a file works."""

from __future__ import annotations

from pathlib import Path

from memsvc.client.admin import AdminClient
from memsvc.server.process import ServerProcess


def test_startup_lines_and_the_admin_key_file(tmp_path: Path, model_dir: Path) -> None:
    data_dir = tmp_path / "data"
    key_file = tmp_path / "admin.key"
    key_file.write_text("a-key-from-a-file\n")
    log_path = tmp_path / "server.log"
    args = ["--data-dir", str(data_dir), "--model", str(model_dir)]
    env = {"MEMSVC_ADMIN_KEY": ""}
    with ServerProcess([*args, "--admin-key-file", str(key_file)], log_path, env=env) as server:
        server.start()
        with AdminClient(server.address, "a-key-from-a-file") as admin:
            assert admin.resident() == []
        server.stop()
        log = log_path.read_text()
        assert f"memsvc serve: gRPC on {server.address}" in log
        assert f"data directory {data_dir} (from --data-dir)" in log
        assert f"admin calls on (key from --admin-key-file {key_file})" in log
        assert "metrics off" in log

    with ServerProcess(args, tmp_path / "again.log", env=env) as server:
        server.start()
        server.stop()
    assert "admin calls off" in (tmp_path / "again.log").read_text()

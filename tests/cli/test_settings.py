"""One data directory for every command, and the admin key from a flag, a file or the env."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memsvc.settings import (
    AdminKey,
    add_admin_key_flags,
    default_data_dir,
    resolve_admin_key,
    user_data_dir,
)


def test_the_data_directory_is_the_env_var_else_the_per_user_one(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    assert default_data_dir({"MEMSVC_DATA_DIR": "/srv/memsvc", "HOME": home}) == Path("/srv/memsvc")
    assert default_data_dir({"XDG_DATA_HOME": "/x/share"}) == Path("/x/share/memsvc")
    assert user_data_dir({}) == Path.home() / ".local" / "share" / "memsvc"
    assert default_data_dir({"MEMSVC_DATA_DIR": ""}) == user_data_dir({})


def test_tenants_from_two_directories_share_one_database(tmp_path: Path) -> None:
    """Run from two working directories, `tenants create` opens one database (with
    ./data the second would have made a second one and accepted the same name)."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    env.pop("MEMSVC_DATA_DIR", None)
    expected = tmp_path / "xdg" / "memsvc"
    results = []
    for cwd in (tmp_path / "one", tmp_path / "two"):
        cwd.mkdir()
        results.append(
            subprocess.run(
                [sys.executable, "-m", "memsvc.cli", "tenants", "create", "zoe", "--json"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=120,
                env={**env, "PYTHONPATH": os.getcwd()},
            )
        )
    first, second = results
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["name"] == "zoe"
    assert f"data directory {expected} (from the per-user default)" in first.stderr
    assert second.returncode == 1 and "already exists" in second.stderr
    assert (expected / "memsvc.db").is_file()
    assert not (tmp_path / "one" / "data").exists()


def _admin_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_admin_key_flags(parser)
    return parser.parse_args(argv)


def test_the_admin_key_comes_from_the_flag_then_the_file_then_the_env(tmp_path: Path) -> None:
    key_file = tmp_path / "admin"
    key_file.write_text("from-file\n")
    env = {"MEMSVC_ADMIN_KEY": "from-env"}
    flag = resolve_admin_key(
        _admin_args("--admin-key", "k", "--admin-key-file", str(key_file)), env
    )
    assert flag == AdminKey("k", "--admin-key")
    from_file = resolve_admin_key(_admin_args("--admin-key-file", str(key_file)), env)
    assert from_file.value == "from-file"
    assert resolve_admin_key(_admin_args(), env) == AdminKey("from-env", "$MEMSVC_ADMIN_KEY")
    off = resolve_admin_key(_admin_args(), {})
    assert off.value is None and "admin calls off" in off.line("serve")
    assert "admin calls on (key from $MEMSVC_ADMIN_KEY)" in AdminKey("x", "$MEMSVC_ADMIN_KEY").line(
        "serve"
    )


def test_an_unreadable_or_empty_key_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        resolve_admin_key(_admin_args("--admin-key-file", str(tmp_path / "missing")), {})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        resolve_admin_key(_admin_args("--admin-key-file", str(tmp_path / "empty")), {})

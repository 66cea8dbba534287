"""Defaults every `memsvc` command shares: the data directory, the admin key, the model.

One place for each, so that `memsvc serve` and `memsvc tenants create` run from two
different directories still open the same database (a relative ``./data`` did not),
and so that a user can see at startup which directory and which admin setting a
command picked up. Importing this module imports nothing heavy: it is read while
the command line is parsed, before any command decides whether it needs torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "MEMSVC_DATA_DIR"
ADMIN_KEY_ENV = "MEMSVC_ADMIN_KEY"

# The shipped models, by the name `--model` takes (a path works too). "default" is the
# model of `serve`, `demo`, `eval` and the benches; each directory has its MODEL_CARD.md.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SHIPPED_MODELS = {
    "default": "reference-model",  # the recall-curriculum delta memory (real text, facts)
    "titans-deep": "titans-deep",  # the seed's deep MLP memory with momentum, depth 2
    "reference-v1": "reference-v1",  # the first shipped model, for sessions pinned to it
}
REFERENCE_MODEL_DIR = ASSETS_DIR / SHIPPED_MODELS["default"]
MODEL_HELP = f"a shipped model ({', '.join(SHIPPED_MODELS)}) or a model directory"


def model_dir(value: str) -> Path:
    """`--model`: a shipped model's name, else a path."""
    if value in SHIPPED_MODELS:
        return ASSETS_DIR / SHIPPED_MODELS[value]
    return Path(value)


def user_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The per-user data directory: ``$XDG_DATA_HOME/memsvc``, else ``~/.local/share/memsvc``."""
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "memsvc"


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$MEMSVC_DATA_DIR`` when set, else the per-user data directory."""
    return Path(env[DATA_DIR_ENV]) if env.get(DATA_DIR_ENV) else user_data_dir(env)


def add_data_dir_flag(parser: argparse.ArgumentParser) -> None:
    """``--data-dir``, defaulting the same way in every command."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help=f"checkpoints, logs and the embedded database (${DATA_DIR_ENV}, "
        "else $XDG_DATA_HOME/memsvc or ~/.local/share/memsvc)",
    )


def data_dir_line(command: str, data_dir: Path) -> str:
    """The startup line naming the data directory and where the choice came from."""
    if data_dir != default_data_dir():
        source = "--data-dir"
    elif os.environ.get(DATA_DIR_ENV):
        source = f"${DATA_DIR_ENV}"
    else:
        source = "the per-user default"
    return f"memsvc {command}: data directory {data_dir.resolve()} (from {source})"


def add_admin_key_flags(parser: argparse.ArgumentParser) -> None:
    """``--admin-key`` and ``--admin-key-file``; ``$MEMSVC_ADMIN_KEY`` is the fallback."""
    parser.add_argument(
        "--admin-key",
        help=f"the admin key (visible in `ps`: prefer --admin-key-file or ${ADMIN_KEY_ENV})",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        help="a file holding the admin key (surrounding whitespace ignored)",
    )


@dataclass(frozen=True)
class AdminKey:
    """The admin key a command resolved, and where it came from (for the startup line)."""

    value: str | None
    source: str

    def line(self, command: str) -> str:
        if self.value is None:
            return (
                f"memsvc {command}: admin calls off (no --admin-key, --admin-key-file "
                f"or ${ADMIN_KEY_ENV})"
            )
        return f"memsvc {command}: admin calls on (key from {self.source})"


def resolve_admin_key(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> AdminKey:
    """The flag, else the file, else the environment; raises ValueError on an unreadable
    or empty file (a typo in a path must not silently switch admin calls off)."""
    if args.admin_key:
        return AdminKey(args.admin_key, "--admin-key")
    if args.admin_key_file is not None:
        try:
            key = args.admin_key_file.read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read --admin-key-file: {error}") from error
        if not key:
            raise ValueError(f"--admin-key-file {args.admin_key_file} is empty")
        return AdminKey(key, f"--admin-key-file {args.admin_key_file}")
    if env.get(ADMIN_KEY_ENV):
        return AdminKey(env[ADMIN_KEY_ENV], f"${ADMIN_KEY_ENV}")
    return AdminKey(None, "nowhere")


def announce(line: str) -> None:
    """Startup lines go to stderr, so a command's stdout stays its result (e.g. JSON)."""
    print(line, file=sys.stderr, flush=True)

"""`memsvc demo`: the service end to end in about a minute, on embedded defaults.

Starts `memsvc serve` in a child process (SQLite and checkpoints in one data
directory), creates a tenant with `memsvc tenants create`, and a session through
the public SDK, streams a long haystack with a pass key hidden far outside the
attention window, restarts the server, asks for the pass key, and prints the
answer, the throughput and where the data lives. Like a user's own program it
talks to the service only through the SDK: the server's modules are imported
just to start its process and to build the haystack, inside `run_demo`.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from memsvc.client import MemoryClient
from memsvc.settings import MODEL_HELP, model_dir


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="stream, restart, recall: the service in a minute")
    demo.add_argument("--model", type=model_dir, default="default", help=MODEL_HELP)
    demo.add_argument(
        "--data-dir",
        type=Path,
        help="where the server keeps it all (default: a new temp dir, so the demo's tenant "
        "stays out of your data directory)",
    )
    demo.add_argument("--tokens", type=int, default=65536, help="haystack length")
    demo.add_argument("--piece-tokens", type=int, default=4096, help="tokens per append")
    demo.add_argument("--seed", type=int, default=0, help="which haystack and pass key")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from memsvc.model.io import load_config
    from memsvc.server.backends import SetupError, check_model_dir
    from memsvc.server.process import ServerProcess
    from memsvc.sessions.durability import SESSIONS_DIR
    from memsvc.store.database import SQLITE_FILENAME
    from memsvc.train.tasks import TaskSpec, sample

    # soft_wrap: a path must stay on one line, copyable, whatever the terminal's width
    # (rich wraps at 80 columns when the output is not a terminal).
    console = Console(soft_wrap=True)
    try:
        check_model_dir(args.model)
    except SetupError as error:
        print(f"memsvc demo: {error}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="memsvc-demo-"))
    window = load_config(args.model).window
    haystack = sample(
        TaskSpec("passkey", args.tokens, needle="out_of_window", window=window), args.seed
    )
    ((question_start, answer_start),) = haystack.questions
    context = haystack.tokens[:question_start].tolist()
    question = haystack.tokens[question_start:answer_start].tolist()
    expected = haystack.answer_texts[0]

    api_key = _create_tenant(data_dir, f"demo-{secrets.token_hex(4)}")

    server = ServerProcess(
        ["--data-dir", str(data_dir), "--model", str(args.model)], data_dir / "server.log"
    )
    console.print(f"starting memsvc serve on {server.address} (data in {data_dir}) ...")
    with server:
        server.start()
        with MemoryClient(server.address, api_key) as client:
            session = client.create_session("demo")
            pieces = [
                context[i : i + args.piece_tokens]
                for i in range(0, len(context), args.piece_tokens)
            ]
            started = time.perf_counter()
            with _progress(console) as progress:
                task = progress.add_task("streaming the haystack", total=len(context))
                for ack in session.append_stream(pieces):
                    progress.update(task, completed=ack.position)
            seconds = time.perf_counter() - started
        console.print(
            "restarting the server (SIGTERM: it checkpoints every session, then exits) ..."
        )
        server.stop()
        server.start()
        with MemoryClient(server.address, api_key) as client:
            session = client.open_session(session.id)
            # A pass key has five digits: the model is asked for exactly that many bytes
            # (it was trained on answers, not on where they end), as `memsvc eval` does.
            answer = session.query(question, temperature=0, max_new_tokens=len(expected))
        server.stop()

    needle_at = haystack.needle[0] if haystack.needle else 0
    verdict = "[green]recalled[/]" if answer.strip() == expected else "[red]not recalled[/]"
    console.print(
        f"pass key hidden at token {needle_at:,} of {len(context):,}; the attention window "
        f"is {window} tokens, so only the memory can hold it"
    )
    console.print(f"answer after the restart: {answer!r} (expected {expected!r}): {verdict}")
    console.print(
        f"streamed {len(context):,} tokens in {seconds:.1f} s through gRPC: "
        f"{len(context) / seconds:,.0f} tokens/s, each durable before its acknowledgement"
    )
    console.print(f"the data lives in {data_dir}:")
    session_dir = data_dir / SESSIONS_DIR / session.id
    for path, what in (
        (
            data_dir / SQLITE_FILENAME,
            "the metadata database (SQLite): tenants, sessions, checkpoints",
        ),
        (session_dir / "wal.log", "the session's write-ahead log: every acknowledged token"),
        (
            session_dir / "checkpoints",
            "its checkpoints (safetensors), the newest written on SIGTERM",
        ),
        (server.log_path, "the server's log (JSON lines)"),
    ):
        console.print(f"  {path}  [dim]{what}[/]")
    return 0


def _create_tenant(data_dir: Path, name: str) -> str:
    """A new tenant's API key, made as an operator makes one: `memsvc tenants create`."""
    command = [sys.executable, "-m", "memsvc.cli", "tenants", "create", name, "--json"]
    done = subprocess.run(
        [*command, "--data-dir", str(data_dir)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)["api_key"]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} / {task.total:,.0f} tokens"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )

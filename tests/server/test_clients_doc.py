"""docs/CLIENTS.md works as written: reflection answers what grpcurl asks, and the
stub-generation steps give a client, outside the `memsvc` name, that talks to a server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from memsvc.client import MemoryClient
from tests.server.harness import Service

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "CLIENTS.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def test_reflection_lists_and_describes_the_services(service: Service) -> None:
    with grpc.insecure_channel(service.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"memsvc.v1.MemoryService", "memsvc.v1.AdminService"} <= services
        assert "grpc.health.v1.Health" in services
        described = DescriptorPool(database).FindServiceByName("memsvc.v1.MemoryService")
        assert {"CreateSession", "Append", "Query", "Stream"} <= set(described.methods_by_name)


def test_stubs_generated_outside_the_memsvc_name_talk_to_the_server(
    service: Service, tmp_path: Path
) -> None:
    generate = next(block for block in _blocks("bash") if "grpc_tools.protoc" in block)
    script = "\n".join(
        line
        for line in generate.replace("\\\n", " ").splitlines()
        if "pip install" not in line  # grpcio-tools is a dev dependency here
    )
    script = script.replace("cp proto/", f"cp {ROOT}/proto/").replace(
        "python -m", f"{sys.executable} -m"
    )
    subprocess.run(["bash", "-euc", script], cwd=tmp_path, check=True, timeout=120)
    assert (tmp_path / "myclient" / "memsvc_v1" / "memsvc_pb2_grpc.py").is_file()

    (client,) = [block for block in _blocks("python") if "myclient.memsvc_v1" in block]
    program = (
        f"api_key = {service.alice.api_key!r}\n"
        + client.replace("127.0.0.1:50051", service.address)
        + "print(session.session_id)\n"
        + "import sys; assert 'memsvc' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    session_id = done.stdout.splitlines()[-1]
    with MemoryClient(service.address, service.alice.api_key) as sdk:
        assert sdk.open_session(session_id).info.position == len(b"The pass key is 71432.")

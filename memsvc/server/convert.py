"""Translation between the wire (`memsvc.proto.v1`) and the session layer's values."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from memsvc.engine import SamplingParams
from memsvc.model.tokenizer import decode
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.sessions.api import (
    AppendResult,
    CheckpointInfo,
    InvalidRequestError,
    ManagerStats,
    ResidentSession,
    SessionEvent,
    SessionInfo,
    Tier,
)

TIERS = {Tier.DEVICE: pb.TIER_DEVICE, Tier.HOST: pb.TIER_HOST, Tier.DISK: pb.TIER_DISK}
EVICTION_TIERS = {pb.TIER_UNSPECIFIED: Tier.DISK, pb.TIER_HOST: Tier.HOST, pb.TIER_DISK: Tier.DISK}


def session(info: SessionInfo) -> pb.Session:
    return pb.Session(
        session_id=info.session_id,
        name=info.name,
        model_hash=info.model_hash,
        position=info.position,
        durable_position=info.durable_position,
        tier=pb.TIER_UNSPECIFIED if info.tier is None else TIERS[info.tier],
        created_at=_timestamp(info.created_at),
        state_bytes=info.state_bytes,
    )


def append_ack(result: AppendResult) -> pb.AppendAck:
    return pb.AppendAck(
        position=result.position,
        appended=result.appended,
        writes_applied=result.writes_applied,
        writes_skipped=result.writes_skipped,
        surprise=result.surprise,
        memory_norm=result.memory_norm,
    )


def query_answer(tokens: list[int]) -> pb.QueryAnswer:
    return pb.QueryAnswer(token_ids=tokens, text=decode(tokens))


def checkpoint_info(info: CheckpointInfo) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(
        session_id=info.session_id,
        generation=info.sequence,  # the proto field keeps its first name
        position=info.position,
        size_bytes=info.size_bytes,
        checksum=info.checksum,
    )


def resident_session(
    resident: ResidentSession, updates_per_1k_tokens: float | None
) -> pb.ResidentSession:
    """A resident session, with its guard's windowed write rate (None: not known yet)."""
    message = pb.ResidentSession(
        session_id=resident.session_id,
        tenant_id=resident.tenant_id,
        tier=TIERS[resident.tier],
        state_bytes=resident.state_bytes,
        position=resident.position,
        last_access=_timestamp(datetime.fromtimestamp(resident.last_access, UTC)),
        pinned=resident.pinned,
        step_scale=resident.step_scale,
        forget_boost=resident.forget_boost,
    )
    optional = {
        "updates_per_1k_tokens": updates_per_1k_tokens,
        "memory_norm": resident.memory_norm,
        "surprise": resident.surprise,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(message, name, value)
    return message


def event(value: SessionEvent) -> pb.Event:
    payload = Struct()
    payload.update(value.payload)
    return pb.Event(
        event_id=value.event_id,
        tenant_id=value.tenant_id,
        session_id=value.session_id or "",
        kind=value.kind,
        created_at=_timestamp(value.created_at),
        payload=payload,
    )


def stats(values: ManagerStats) -> pb.Stats:
    return pb.Stats(
        resident={tier.value: n for tier, n in values.resident.items()},
        bytes_used={tier.value: n for tier, n in values.bytes_used.items()},
        budgets={tier.value: n for tier, n in values.budgets.items()},
        evictions=values.evictions,
        restores=values.restores,
        appends=values.appends,
        tokens_appended=values.tokens_appended,
        checkpoints=values.checkpoints,
        corruptions=values.corruptions,
        quarantined=values.quarantined,
        restore_seconds=values.restore_seconds,
        eviction_seconds=values.eviction_seconds,
    )


def sampling_params(message: pb.SamplingParams) -> SamplingParams:
    """Absent fields take SamplingParams' defaults; invalid values are INVALID_ARGUMENT."""
    given = {
        name: getattr(message, name)
        for name in ("temperature", "top_k", "top_p", "max_new_tokens", "allow_eos", "seed")
        if message.HasField(name)
    }
    try:
        return SamplingParams(stop=tuple(message.stop), **given)
    except ValueError as error:
        raise InvalidRequestError(f"params: {error}") from None


def eviction_tier(tier: pb.Tier) -> Tier:
    if tier not in EVICTION_TIERS:
        name = pb.Tier.Name(tier) if tier in pb.Tier.values() else f"tier {tier}"
        raise InvalidRequestError(f"cannot evict to {name}: use TIER_HOST or TIER_DISK")
    return EVICTION_TIERS[tier]


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp

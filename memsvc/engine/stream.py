"""`StreamingEngine`: append, generate and batched steps over `ModelState`s.

The engine runs a frozen `MAGModel` under `torch.no_grad`; it keeps no state
of its own. A state here always holds one stream (batch 1): `step_batch`
stacks sessions into batches itself and hands back single-stream states.

Batching. `ModelState.stack` needs every stream at the same offset in the
memory chunk (the memory's pending partial chunk has one length per batch),
and one forward needs the same number of new tokens per stream (padding
would be written into the memory). So `step_batch` cuts each session's
tokens at chunk boundaries and runs rounds; in each round a session brings

    pending p > 0:                  min(remaining, C - p) tokens  (finish its partial chunk)
    p == 0, remaining >= C:         whole chunks                  (the round's "whole" group)
    p == 0, remaining < C:          the remaining tokens          (its last partial chunk)

Sessions with the same (p, length) form one batch. The "whole" group runs as
one batch of the smallest whole-chunk count among its members (at most
`max_segment`), so sessions of unequal lengths share a forward for as long
as they overlap. A session alone in its batch shares nothing, so it takes all
it has left (at most `max_segment`) in one forward, on its own state (no
stacking): a lone session's unaligned append is one forward, not one per
chunk boundary. Every cut is a split of the session's stream, and the model
gives the same outputs for any split: each session ends exactly where
appending it alone would (to float tolerance).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import decode_step
from memsvc.engine.decode import DecodeBatch, StopRule, make_generator
from memsvc.engine.pool import DecodePool
from memsvc.engine.sampling import SamplingParams, sample_next
from memsvc.model import MAGModel, ModelState, chunk_fast
from memsvc.model.chunk_fast import ChunkPath
from memsvc.model.decode import Decoder

Tokens = Sequence[int] | Tensor


@dataclass(frozen=True)
class AppendStats:
    """A session after an append; memory counters are summed over layers."""

    position: int  # tokens the stream has seen
    appended: int  # tokens this call brought
    writes_applied: int  # memory chunks written (all layers)
    writes_skipped: int  # memory chunks the write gate skipped (all layers)
    surprise_ema: float  # the write gate's surprise EMA, mean over layers
    memory_norm: float  # L2 norm of all memory weights (every layer and head)
    last_logits: Tensor | None  # (V,) next-token logits after the last token; None if none came


class StreamingEngine:
    """Streams tokens through a frozen model for any number of single-stream states.

    max_segment bounds the tokens of one forward (the activations grow with
    it); it must be a multiple of the memory chunk. use_memory=False runs the
    sliding-window-only ablation: the memory branch reads as zero and its
    state never changes. fast_decode=False is the reference engine: it generates
    through the chunk path (`_forward`) one token at a time, and that path is
    `MAGModel.forward` throughout; the decoder and the C++ chunk path are held to it.
    decode_cpp=False keeps both C++ kernels (decode step, small chunks) off."""

    def __init__(
        self,
        model: MAGModel,
        max_segment: int = 4096,
        use_memory: bool = True,
        fast_decode: bool = True,
        decode_cpp: bool = True,
    ) -> None:
        config = model.config
        self.model = model
        self.use_memory = use_memory
        self.chunk_size = config.memory.chunk_size if config.use_memory else 1
        if max_segment < self.chunk_size or max_segment % self.chunk_size:
            raise ValueError(
                f"max_segment must be a positive multiple of the memory chunk "
                f"{self.chunk_size}, got {max_segment}"
            )
        self.max_segment = max_segment
        self.device = model.embed.weight.device
        # The token-at-a-time decoder (memsvc.model.decode) for generation; it covers
        # float32 and float64 models, others take the chunk path token by token.
        self.fast_decode = fast_decode and model.embed.weight.dtype in (
            torch.float32,
            torch.float64,
        )
        # Its C++ step (kernels/decode_step) on the CPU: asking for it here starts the
        # build (about a minute, once per machine, environment and source) in the
        # background; the decoder runs its eager step until the build is ready.
        self.decode_cpp = decode_cpp
        if self.fast_decode and decode_cpp and self.device.type == "cpu":
            decode_step.module()
        # One stream's small append (1 .. W tokens) through the C++ block
        # (memsvc/model/chunk_fast.py) once the same extension is built; built on first use.
        self._chunk_cpp = fast_decode and decode_cpp and chunk_fast.supports(model)
        self._chunk: ChunkPath | None = None

    @torch.no_grad()
    def init_state(self) -> ModelState:
        """A fresh single-stream state (its memory weights start as views of the model's)."""
        return self.model.init_state(1, self.device)

    def append(self, state: ModelState, tokens: Tokens) -> tuple[ModelState, AppendStats]:
        """Feed a 1-D token list to one stream; returns its new state and stats."""
        _check_single(state)
        ids = self.as_tokens(tokens)
        last_logits = None
        for start in range(0, len(ids), self.max_segment):
            logits, state = self._forward(ids[None, start : start + self.max_segment], state)
            last_logits = logits[0]
        return state, _stats(state, len(ids), last_logits)

    def step_batch(
        self, states: Sequence[ModelState], tokens: Sequence[Tokens]
    ) -> list[tuple[ModelState, AppendStats]]:
        """Append tokens[i] to states[i] for every session, batching the forwards
        (module docstring); each result equals `append(states[i], tokens[i])`."""
        if len(states) != len(tokens):
            raise ValueError(f"{len(states)} states but {len(tokens)} token lists")
        for state in states:
            _check_single(state)
        ids = [self.as_tokens(t) for t in tokens]
        current = list(states)
        done = [0] * len(ids)
        last_logits: list[Tensor | None] = [None] * len(ids)
        while rounds := self._plan_round(
            [_pending(s) for s in current], [len(t) - d for t, d in zip(ids, done, strict=True)]
        ):
            for length, members in rounds:
                if len(members) == 1 or self.steps_alone():  # no stacking
                    for i in members:
                        logits, current[i] = self._forward(
                            ids[i][None, done[i] : done[i] + length], current[i]
                        )
                        last_logits[i] = logits[0]
                        done[i] += length
                    continue
                batch = torch.stack([ids[i][done[i] : done[i] + length] for i in members])
                stacked = ModelState.stack([current[i] for i in members])
                logits, stacked = self._forward(batch, stacked)  # (B, V)
                for row, (i, state) in enumerate(zip(members, stacked.unstack(), strict=True)):
                    current[i], last_logits[i] = state, logits[row]
                    done[i] += length
        return [
            (state, _stats(state, len(t), logits))
            for state, t, logits in zip(current, ids, last_logits, strict=True)
        ]

    def generate(
        self, state: ModelState, prompt_tokens: Tokens, params: SamplingParams
    ) -> Generation:
        """Append the prompt, then sample token by token (see `Generation`)."""
        _check_single(state)
        prompt = self.as_tokens(prompt_tokens)
        if len(prompt) == 0:
            raise ValueError("generate needs at least one prompt token (sampling starts from it)")
        return Generation(self, state, prompt, params)

    def decode_batch(
        self,
        states: Sequence[ModelState],
        prompts: Sequence[Tokens],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> DecodeBatch:
        """Generate for several sessions at once: the prompts are appended batched
        (`step_batch`), then every step samples one token per session and feeds them
        through one decoder step. Session i gets the tokens and final state that
        `generate(states[i], prompts[i], params[i])` gives (see `DecodeBatch`)."""
        per_session = [params] * len(states) if isinstance(params, SamplingParams) else params
        if not len(states) == len(prompts) == len(per_session):
            raise ValueError(
                f"{len(states)} states, {len(prompts)} prompts, {len(per_session)} params"
            )
        if not states:
            raise ValueError("decode_batch needs at least one session")
        ids = [self.as_tokens(p) for p in prompts]
        if any(len(p) == 0 for p in ids):
            raise ValueError("generate needs at least one prompt token (sampling starts from it)")
        appended = self.step_batch(states, ids)
        decoder = Decoder(
            self.model, [s for s, _ in appended], self.use_memory, fast=self.decode_cpp
        )
        logits = torch.stack([stats.last_logits for _, stats in appended])  # (B, V)
        starts = [s for s, _ in appended]
        return DecodeBatch(self.decoder_for, decoder, logits, per_session, starts, self.replay)

    def decode_pool(self) -> DecodePool:
        """An empty `DecodePool`: generations join it and leave it at any step."""
        return DecodePool(self)

    def decoder_for(self, states: Sequence[ModelState], start: int = 0) -> Decoder:
        """Decoder rows for `states`, laid out to join a decoder at step `start`."""
        return Decoder(self.model, states, self.use_memory, start, fast=self.decode_cpp)

    def replay(self, state: ModelState, tokens: Sequence[int]) -> tuple[ModelState, Tensor]:
        """`tokens` appended to `state` on the chunk path, and the logits (V,) after them."""
        state, stats = self.append(state, list(tokens))
        assert stats.last_logits is not None, "replay needs at least one token"
        return state, stats.last_logits

    def as_tokens(self, tokens: Tokens) -> Tensor:
        """A 1-D int64 tensor on the model's device, every id inside the vocabulary; ValueError
        otherwise. Every call checks its tokens with it; the session layer checks a request's
        tokens with it before anything changes."""
        if torch.is_tensor(tokens):
            ids = tokens
        else:  # no dtype given, so floats and bools show as such instead of being cast
            ids = torch.tensor(list(tokens)) if len(tokens) else torch.zeros(0, dtype=torch.int64)
        if ids.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"tokens must be integers, got {ids.dtype}")
        vocab = self.model.config.vocab_size
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {vocab})")
        return ids.to(self.device, torch.int64)

    # ---- internals ---------------------------------------------------------------------

    @torch.no_grad()
    def _forward(self, tokens: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """tokens (B, T) -> next-token logits (B, V) after the last of them, and the state."""
        chunk = self._chunk_path()
        window = self.model.config.window
        if chunk is not None and chunk.runs(tokens[:, :window], state):
            # One stream on the C++ block, W tokens a call: beats the eager forward of a
            # long append too (4,096 tokens: 56k against 25-31k tokens/s, docs/BENCHMARKS.md).
            for start in range(0, tokens.shape[1], window):
                logits, state = chunk.forward(
                    tokens[:, start : start + window], state, self.use_memory
                )
            return logits, state
        logits, state = self.model(tokens, state, use_memory=self.use_memory, last_only=True)
        return logits[:, -1], state

    def steps_alone(self) -> bool:
        """Whether `step_batch` runs its sessions one by one (the C++ chunk path, below), so
        that stepping them in separate calls costs no shared forward."""
        return self._chunk_path() is not None

    def _chunk_path(self) -> ChunkPath | None:
        """The C++ chunk path, once the extension is ready (None before, or when off).
        With it, sessions stepped together run one by one: one stream's calls beat the
        batched eager forward of many (32 x 64 tokens: 56 ms against 62 ms; 8 x 64: 14
        against 17; 8 x 512: see docs/BENCHMARKS.md)."""
        if self._chunk is None and self._chunk_cpp:
            cpp = decode_step.module()
            if cpp is not None:
                self._chunk = ChunkPath(self.model, cpp)
        return self._chunk

    def _plan_round(self, pending: list[int], remaining: list[int]) -> list[tuple[int, list[int]]]:
        """One round of step_batch: (length, sessions) batches, each session at most once."""
        c = self.chunk_size
        groups: dict[tuple[int, int], list[int]] = {}
        whole: list[int] = []
        for i, (p, r) in enumerate(zip(pending, remaining, strict=True)):
            if r == 0:
                continue
            if p == 0 and r >= c:
                whole.append(i)
            else:
                groups.setdefault((p, min(r, c - p) if p else r), []).append(i)
        if whole:
            groups[(0, min(remaining[i] - remaining[i] % c for i in whole))] = whole
        return [
            (min(remaining[members[0]] if len(members) == 1 else length, self.max_segment), members)
            for (_, length), members in groups.items()
        ]


class Generation:
    """Iterator over the token ids one `StreamingEngine.generate` call produces.

    Stops after max_new_tokens sampled tokens, at EOS (not yielded) or when
    the output ends with a stop sequence (not yielded: tokens that may begin
    one are held back until they cannot). Once exhausted, `state` has seen
    the prompt and exactly the yielded tokens, and `finish_reason` is
    "length", "eos" or "stop". A given seed gives the same tokens every time,
    on the decoder and on the reference path alike.
    """

    def __init__(
        self, engine: StreamingEngine, state: ModelState, prompt: Tensor, params: SamplingParams
    ) -> None:
        self.state: ModelState | None = None
        self.finish_reason: str | None = None
        generator = make_generator(params, engine.device)
        self._steps = self._run(engine, state, prompt, params, generator)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        return next(self._steps)

    def close(self) -> None:
        """Stop sampling (nothing to release: the state is the caller's to keep)."""
        self._steps.close()

    def _run(
        self,
        engine: StreamingEngine,
        state: ModelState,
        prompt: Tensor,
        params: SamplingParams,
        generator: torch.Generator,
    ) -> Iterator[int]:
        rule = StopRule(params)
        logits, state = engine._forward(prompt[None], state)  # (1, V)
        decoder = (
            Decoder(engine.model, [state], engine.use_memory, fast=engine.decode_cpp)
            if engine.fast_decode
            else None
        )
        while True:
            sampled = sample_next(logits, params, generator)  # (1,)
            token = int(sampled[0])
            if decoder is None:
                verdict = rule.accept(token, lambda state=state: state)
            else:
                verdict = rule.accept(token, lambda: decoder.state(0))
            yield from verdict.released
            if verdict.feed:
                if decoder is None:
                    ids = torch.tensor([[token]], device=engine.device)
                    logits, state = engine._forward(ids, state)
                else:
                    logits = decoder.step(sampled)
            if verdict.finish_reason is not None:
                break
        if verdict.state is not None:
            state = verdict.state
        elif decoder is not None:
            state = decoder.state(0)
        self.state, self.finish_reason = state, verdict.finish_reason


def _check_single(state: ModelState) -> None:
    if state.batch != 1:
        raise ValueError(f"the engine takes single-stream states, got one of {state.batch} streams")


def _pending(state: ModelState) -> int:
    """Tokens in the memory's partial chunk (the same in every layer; 0 without memory)."""
    memory = state.blocks[0].memory
    return 0 if memory is None else memory.pending


@torch.no_grad()
def _stats(state: ModelState, appended: int, last_logits: Tensor | None) -> AppendStats:
    memories = [block.memory for block in state.blocks if block.memory is not None]
    weights = [w for m in memories for w in m.weights]
    return AppendStats(
        position=int(state.position[0]),
        appended=appended,
        writes_applied=sum(int(m.writes_applied[0]) for m in memories),
        writes_skipped=sum(int(m.writes_skipped[0]) for m in memories),
        surprise_ema=float(torch.stack([m.surprise_ema[0] for m in memories]).mean())
        if memories
        else 0.0,
        memory_norm=float(sum(w.double().square().sum() for w in weights) ** 0.5)
        if weights
        else 0.0,
        last_logits=last_logits,
    )

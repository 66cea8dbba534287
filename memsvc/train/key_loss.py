"""The key-alignment loss: teach the memory to file a fact under its key.

Measured (docs/TRAINING.md): after keyed-fact training the memory query that reads an
answer is about as close to every fact's write key as to its own (the nearest key is the
right one at chance, 6-8 of 24 questions with 4 facts), so the memory returns one value
for every key. The answer loss reaches those keys only through the delta rule's whole
recurrence; this loss shapes them directly. With lookahead keys a value's byte at t is
stored under the query of t - 1, and the read before the same byte of the answer uses
the query there; so, per block and answer byte, a softmax over every value byte of every
fact of the batch (the other samples' facts are negatives too: another key in the same
phrasing) of the mean cosine (over heads) between the read query and each write query,
divided by `temperature`, with the same byte of the question's own fact as the target:
the key must carry the fact's key and the place in its value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memsvc.memory.neural_memory import NeuralMemory

if TYPE_CHECKING:
    from memsvc.train.recipe import TrainRecipe
    from memsvc.train.tasks import Batch


def keep_queries(model: nn.Module) -> list[NeuralMemory]:
    """Every memory of `model`, each told to keep its last forward's queries."""
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    for memory in memories:
        memory.keep_queries = True
    return memories


def key_alignment_loss(
    queries: list[Tensor], heads: int, writes: Tensor, reads: Tensor, temperature: float
) -> Tensor | None:
    """queries: per block (B*H, T, d) unit vectors; writes (n_w, 2) rows (sample, position);
    reads (n_r, 3) rows (sample, position, write row). Mean cross-entropy over blocks and
    reads; None when the batch has no reads."""
    if reads.shape[0] == 0:
        return None
    losses = []
    for q in queries:
        n, t, d = q.shape
        q = q.view(n // heads, heads, t, d)
        k = q[writes[:, 0], :, writes[:, 1]]  # (n_w, H, d)
        r = q[reads[:, 0], :, reads[:, 1]]  # (n_r, H, d)
        sims = torch.einsum("rhd,whd->rw", r, k) / (heads * temperature)
        losses.append(F.cross_entropy(sims, reads[:, 2]))
    return torch.stack(losses).mean()


BACKGROUND_WEIGHT = 10.0  # random unit keys of 32 dims give a background of about 1/32


def linear_key_loss(
    queries: list[Tensor], heads: int, writes: Tensor, reads: Tensor
) -> Tensor | None:
    """The loss for what a linear (delta-rule) memory needs, not only a nearest key: it
    returns the sum of every stored value weighted by its key's dot product with the
    query, so the read query must meet its own write key (1 - cos) and be near-orthogonal
    to every other key written before it: BACKGROUND_WEIGHT x the mean squared cosine
    to the queries of every earlier position of its sample (the memory's other keys).
    Mean over blocks, heads and reads; None when the batch has no reads."""
    if reads.shape[0] == 0:
        return None
    own_rows = writes[reads[:, 2]]  # (n_r, 2)
    losses = []
    for q in queries:
        n, t, d = q.shape
        q = q.view(n // heads, heads, t, d)
        r = q[reads[:, 0], :, reads[:, 1]]  # (n_r, H, d)
        own = (r * q[own_rows[:, 0], :, own_rows[:, 1]]).sum(-1)  # (n_r, H)
        background = torch.empty_like(own)
        for b in reads[:, 0].unique().tolist():
            rows = (reads[:, 0] == b).nonzero().squeeze(1)
            sims = torch.einsum("rhd,htd->rht", r[rows], q[b])  # (n, H, T)
            earlier = torch.arange(t, device=q.device)[None] < reads[rows, 1, None]  # (n, T)
            mean_sq = (sims.square() * earlier[:, None]).sum(-1) / earlier.sum(-1, keepdim=True)
            background[rows] = mean_sq
        losses.append(((1 - own) + BACKGROUND_WEIGHT * background).mean())
    return torch.stack(losses).mean()


def spread_key_loss(queries: list[Tensor], heads: int, writes: Tensor) -> Tensor | None:
    """What keeps facts apart in a delta-rule memory: every value byte of every fact of a
    sample written under its own near-orthogonal key. BACKGROUND_WEIGHT x the mean squared
    cosine between the write keys of two different value bytes of the same sample, over
    blocks, heads and pairs; None when no sample writes two bytes."""
    samples = [
        rows
        for b in writes[:, 0].unique().tolist()
        if len(rows := (writes[:, 0] == b).nonzero().squeeze(1)) > 1
    ]
    if not samples:
        return None
    losses = []
    for q in queries:
        n, t, d = q.shape
        q = q.view(n // heads, heads, t, d)
        per_sample = []
        for rows in samples:
            k = q[writes[rows, 0], :, writes[rows, 1]]  # (m, H, d)
            gram = torch.einsum("ahd,bhd->hab", k, k).square()  # (H, m, m)
            m = k.shape[0]
            per_sample.append(
                (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (m * (m - 1))
            )
        losses.append(torch.stack(per_sample).mean())
    return BACKGROUND_WEIGHT * torch.stack(losses).mean()


def with_key_loss(
    loss: Tensor, memories: list[NeuralMemory], batch: Batch, recipe: TrainRecipe
) -> Tensor:
    """`loss` + recipe.key_loss_weight x the key-alignment loss of the forward just run."""
    queries = [m.last_queries for m in memories]
    if any(q is None for q in queries):
        raise RuntimeError("the memories kept no queries: run the forward first")
    heads, writes, reads = memories[0].config.heads, batch.fact_writes, batch.fact_reads
    align = None
    if recipe.key_loss_kind in ("softmax", "both", "spread"):
        align = key_alignment_loss(queries, heads, writes, reads, recipe.key_loss_temperature)  # type: ignore[arg-type]
    if recipe.key_loss_kind in ("linear", "both"):
        linear = linear_key_loss(queries, heads, writes, reads)  # type: ignore[arg-type]
        align = linear if align is None or linear is None else align + linear
    if recipe.key_loss_kind == "spread":
        spread = spread_key_loss(queries, heads, writes)  # type: ignore[arg-type]
        align = spread if align is None else align if spread is None else align + spread
    return loss if align is None else loss + recipe.key_loss_weight * align

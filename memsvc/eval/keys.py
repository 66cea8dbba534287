"""`memsvc eval keys`: does the memory file each fact under its own key?

memsvc eval keys --facts 4 --length 1k --samples 8                 # held-out phrasing
memsvc eval keys --model runs/x/model --vocabulary train

Keyed recall needs the memory query that reads an answer to be closest to the key its
fact's value was written under. With lookahead keys the value's first byte at t is
stored under the query of t - 1, and the read before the answer's first byte uses the
query there. For every question of every probe (the facts probes of `memsvc eval
facts`, each question after the whole context) and every block, this reports:

- key match: the share of questions whose read query is nearest (mean cosine over
  heads) to their own fact's write key among the probe's facts; chance is 1 / facts;
- own / other: the mean cosine to the own fact's key and to the others'.

A model that answers every question with one value (the "other key" column of `memsvc
eval facts`) shows key match near chance: the keys carry the phrasing, not the key.
The probe runs through `MAGModel.forward` in one call (training's path), so it needs
the context and a question to fit in memory: lengths up to about 16k.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memsvc.eval.options import add_model_options, load_eval_model, parse_length
from memsvc.train.phrasing import VALUE_KINDS

if TYPE_CHECKING:
    from memsvc.model import MAGModel


@dataclass(frozen=True)
class BlockKeys:
    matched: int  # questions whose nearest write key is their own fact's
    questions: int
    own: float  # mean cosine to the own fact's key
    other: float  # mean cosine to the other facts' keys

    @property
    def match(self) -> float:
        return self.matched / max(1, self.questions)


def key_match(
    model: MAGModel, length: int, n_facts: int, samples: int, vocabulary: str, kinds: tuple
) -> list[BlockKeys]:
    """Per block, how the read queries of `samples` probes meet their facts' write keys."""
    import torch

    from memsvc.model.tokenizer import PAD_ID
    from memsvc.train.facts import make_fact_probe
    from memsvc.train.key_loss import keep_queries

    memories = keep_queries(model)
    heads = memories[0].config.heads
    counts = [[0, 0, 0.0, 0.0, 0] for _ in memories]  # matched, asked, own, other, pairs
    window = model.config.window
    try:
        for seed in range(samples):
            probe = make_fact_probe(
                seed, length, n_facts, kinds, window=window, vocabulary=vocabulary
            )
            context = probe.context.tolist()
            writes = [_find(context, q.answer.encode()) - 1 for q in probe.questions]
            # Every question after the context in one batch, padded on the right (causal:
            # the padding changes no earlier position); each row reads at its last token.
            rows = [torch.cat([probe.context, q.question]) for q in probe.questions]
            tokens = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.int64)
            for row, ids in zip(tokens, rows, strict=True):
                row[: len(ids)] = ids
            with torch.no_grad():
                model(tokens)
            for index, ids in enumerate(rows):
                for count, memory in zip(counts, memories, strict=True):
                    q = memory.last_queries
                    q = q.view(len(rows), heads, *q.shape[1:])[index]  # (H, T, d)
                    read = q[:, len(ids) - 1 : len(ids)]
                    cos = (read * q[:, writes]).sum(-1).mean(0)  # (facts,)
                    count[0] += int(int(cos.argmax()) == index)
                    count[1] += 1
                    count[2] += float(cos[index])
                    others = torch.cat([cos[:index], cos[index + 1 :]])
                    count[3] += float(others.sum())
                    count[4] += len(others)
    finally:
        for memory in memories:
            memory.keep_queries, memory.last_queries = False, None
    return [
        BlockKeys(m, n, own / max(1, n), other / max(1, pairs))
        for m, n, own, other, pairs in counts
    ]


def _block_json(b: BlockKeys) -> dict:
    return {
        "key_match": round(b.match, 4),
        "questions": b.questions,
        "own_cosine": round(b.own, 4),
        "other_cosine": round(b.other, 4),
    }


def _find(context: list[int], value: bytes) -> int:
    """The token index of the value's first byte in the context (its first occurrence)."""
    data = bytes(t if t < 256 else 0 for t in context)
    at = data.find(value)
    if at < 0:
        raise AssertionError(f"the value {value!r} is not in the context")
    return at


def add_keys_parser(evals: argparse._SubParsersAction) -> None:
    keys = evals.add_parser(
        "keys",
        help="whether the memory files each fact under its own key (read query vs write keys)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(keys)
    keys.add_argument("--length", type=parse_length, default="1k", help="context tokens (1k)")
    keys.add_argument("--facts", type=int, default=4, help="facts per probe (4)")
    keys.add_argument("--samples", type=int, default=8, help="probes (8)")
    keys.add_argument("--values", default="digits", help=f"value kinds ({', '.join(VALUE_KINDS)})")
    keys.add_argument("--vocabulary", choices=("heldout", "train"), default="heldout")
    keys.add_argument("--json", action="store_true", help="print one JSON object")
    keys.set_defaults(func=run_keys_command)


def run_keys_command(args: argparse.Namespace) -> int:
    kinds = tuple(args.values.split(","))
    unknown = [k for k in kinds if k not in VALUE_KINDS]
    if unknown or args.facts < 2 or args.samples < 1:
        raise SystemExit(
            f"memsvc eval keys: need --facts >= 2, --samples >= 1 and value kinds in "
            f"{', '.join(VALUE_KINDS)} (got facts {args.facts}, values {args.values})"
        )
    model = load_eval_model(args)
    blocks = key_match(model, args.length, args.facts, args.samples, args.vocabulary, kinds)
    report = {
        "model": str(args.model),
        "length": args.length,
        "facts": args.facts,
        "samples": args.samples,
        "vocabulary": args.vocabulary,
        "chance": round(1 / args.facts, 4),
        "blocks": [_block_json(b) for b in blocks],
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(
        f"{args.facts} facts in {args.length} tokens, {args.samples} probes, "
        f"{args.vocabulary} phrasing (chance {report['chance']:.0%})"
    )
    for i, b in enumerate(blocks):
        print(
            f"  block {i}: key match {b.matched}/{b.questions} ({b.match:.0%}), "
            f"cosine own {b.own:.2f} vs other {b.other:.2f}"
        )
    return 0

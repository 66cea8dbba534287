"""`memsvc bench reliability`: load, faults and bad input against loopback clusters; prints a
report (and writes it as JSON). docs/RELIABILITY.md holds the figures of a full run."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from memsvc.reliability.fuzz import MissingExtraError, require_hypothesis
from memsvc.settings import MODEL_HELP, model_dir

PARTS = ("load", "faults", "fuzz")
# scenarios.FAULTS' keys, named here so that building the parser imports nothing heavy.
FAULT_NAMES = ("kill", "redis", "postgres", "disk", "client")


def add_reliability_parser(benches: argparse._SubParsersAction) -> None:
    parser = benches.add_parser(
        "reliability",
        help="load, faults (kill -9, Redis/PostgreSQL restart, full disk, ...) "
        "and fuzzed bad input on loopback clusters of private services",
    )
    parser.add_argument("--model", type=model_dir, default="default", help=MODEL_HELP)
    parser.add_argument("--workdir", type=Path, help="where clusters live (default: a temp dir)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    parser.add_argument("--clients", type=int, default=64, help="load: concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="load: seconds")
    parser.add_argument("--piece-tokens", type=int, default=128, help="load: tokens per append")
    faults = ",".join(FAULT_NAMES)
    parser.add_argument("--faults", default=faults, help=f"of {faults}")
    parser.add_argument("--fault-seconds", type=float, default=6.0, help="after each fault")
    parser.add_argument("--fuzz-examples", type=int, default=200, help="per RPC group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.set_defaults(func=run_reliability)


def run_reliability(args: argparse.Namespace) -> int:
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    if "fuzz" in parts:  # before any part runs: a missing extra should not cost a load run
        try:
            require_hypothesis()
        except MissingExtraError as error:
            print(f"memsvc bench reliability: {error}", file=sys.stderr)
            return 2
    from memsvc.reliability import scenarios

    unknown = sorted(set(parts) - set(PARTS))
    faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown += sorted(set(faults) - set(scenarios.FAULTS))
    if unknown:
        print(f"memsvc bench reliability: unknown parts or faults {unknown}")
        return 2
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}".strip(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(args.model),
    }
    with tempfile.TemporaryDirectory(prefix="memsvc-reliability-") as scratch:
        root = args.workdir or Path(scratch)
        if "load" in parts:
            report["load"] = scenarios.timed(
                lambda: scenarios.run_load(
                    root / "load",
                    args.model,
                    clients=args.clients,
                    duration_s=args.duration,
                    piece_tokens=args.piece_tokens,
                )
            )
            _print_load(report["load"])
        if "faults" in parts:
            report["faults"] = []
            for name in faults:
                fault = scenarios.FAULTS[name]
                result = scenarios.timed(
                    lambda fault=fault, name=name: fault(
                        root / f"fault-{name}", args.model, seconds=args.fault_seconds
                    )
                )
                report["faults"].append(result)
                _print_fault(result)
        if "fuzz" in parts:
            report["bad_input"] = scenarios.timed(
                lambda: scenarios.run_bad_input(
                    root / "fuzz", args.model, examples=args.fuzz_examples, seed=args.seed
                )
            )
            _print_fuzz(report["bad_input"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if _clean(report) else 1


def _clean(report: dict[str, Any]) -> bool:
    """Nothing acknowledged lost or doubled, no state differing, no fuzz failure."""
    verdicts = [report["load"]["verdict"]] if "load" in report else []
    verdicts += report.get("faults", [])
    ok = all(
        v["lost_tokens"] == 0 and v["extra_tokens"] == 0 and v["states_differing"] == 0
        for v in verdicts
    )
    return ok and not report.get("bad_input", {}).get("failures")


def _print_load(load: dict[str, Any]) -> None:
    verdict = load["verdict"]
    print(
        f"load: {load['clients']} clients x {load['duration_s']} s: {load['tokens_per_s']} tok/s, "
        f"ack p50/p99/max {load['ack_ms']['p50']}/{load['ack_ms']['p99']}/"
        f"{load['ack_ms']['max']} ms, errors {load['errors'] or 'none'}, server RSS "
        f"{load['rss_mb'][0][1] if load['rss_mb'] else '?'} -> "
        f"{load['rss_mb'][-1][1] if load['rss_mb'] else '?'} MB "
        f"(growth {load['rss_growth_pct']}% after warm-up); lost {verdict['lost_tokens']} of "
        f"{verdict['acknowledged_tokens']} acknowledged tokens"
    )


def _print_fault(fault: dict[str, Any]) -> None:
    print(
        f"fault {fault['fault']}: {fault['note']}; "
        f"clients saw {fault['errors_seen'] or 'nothing'}, "
        f"longest stall {fault['longest_stall_s']} s; lost {fault['lost_tokens']} / extra "
        f"{fault['extra_tokens']} of {fault['acknowledged_tokens']} acknowledged tokens; states "
        f"differing {fault['states_differing']}/{fault['states_checked']}"
    )


def _print_fuzz(fuzz: dict[str, Any]) -> None:
    summary = {key: value for key, value in fuzz.items() if key not in ("per_rpc", "failures")}
    print(f"bad input: {json.dumps(summary, default=str)}")
    for failure in fuzz.get("failures", [])[:10]:
        print(f"  FAILURE {failure}")

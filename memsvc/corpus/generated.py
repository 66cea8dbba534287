"""The generated kinds of the corpus: JSON records and log lines, as agents see them in tool
output, made with Faker from a seed per document.

Held out by family: the evaluation split uses record schemas, log formats and
Faker locales that the training split never uses, so a model that learned the
shape of one family is tested on another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import cache
from typing import Any

from memsvc.corpus.sources import Document, Split

DOCUMENTS_PER_FAMILY = 400
RECORDS_PER_DOCUMENT = 24
LOCALES: dict[Split, tuple[str, ...]] = {
    "train": ("en_US", "de_DE", "fr_FR", "zh_CN", "ja_JP", "es_ES"),
    "eval": ("en_GB", "it_IT", "zh_TW", "pt_BR", "nl_NL", "ko_KR"),
}


# Fixed bounds: Faker's own date helpers end at "now", which would change the corpus daily.
_EPOCH, _END = datetime(2000, 1, 1), datetime(2026, 1, 1)


def _when(f: Any) -> datetime:
    return f.date_time_between(start_date=_EPOCH, end_date=_END)


@cache
def _faker(locale: str) -> Any:
    from faker import Faker

    return Faker(locale)  # slow to build: one per locale, re-seeded per document


def _seed(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


# ---- JSON records -----------------------------------------------------------------------------


def _user(f: Any) -> dict:
    return {
        "id": f.random_int(1, 10**6),
        "name": f.name(),
        "email": f.email(),
        "address": f.address().replace("\n", ", "),
        "phone": f.phone_number(),
        "company": f.company(),
        "joined": _when(f).date().isoformat(),
        "active": f.boolean(),
    }


def _order(f: Any) -> dict:
    items = [
        {
            "sku": f.bothify("??-####").upper(),
            "qty": f.random_int(1, 9),
            "price": f.pyfloat(2, 2, True),
        }
        for _ in range(f.random_int(1, 4))
    ]
    return {
        "order_id": f.uuid4(),
        "customer": f.name(),
        "items": items,
        "total": round(sum(i["qty"] * i["price"] for i in items), 2),
        "currency": f.currency_code(),
        "status": f.random_element(("new", "paid", "shipped", "cancelled")),
        "created_at": _when(f).isoformat(),
    }


def _tool_call(f: Any) -> dict:
    return {
        "tool": f.random_element(("web_search", "read_file", "list_dir", "http_get")),
        "query": f.sentence(),
        "results": [
            {"title": f.catch_phrase(), "url": f.url(), "snippet": f.paragraph(2)}
            for _ in range(f.random_int(1, 3))
        ],
        "latency_ms": f.random_int(3, 2500),
    }


def _ticket(f: Any) -> dict:
    return {
        "ticket": f.bothify("???-####").upper(),
        "reporter": f.user_name(),
        "summary": f.sentence(),
        "priority": f.random_element(("P0", "P1", "P2", "P3")),
        "labels": f.words(f.random_int(0, 3)),
        "comments": [
            {"author": f.name(), "body": f.paragraph(), "at": _when(f).isoformat()}
            for _ in range(f.random_int(0, 3))
        ],
    }


def _sensor(f: Any) -> dict:
    return {
        "device": f.hexify("^^:^^:^^:^^:^^:^^"),
        "location": {"lat": float(f.latitude()), "lon": float(f.longitude()), "city": f.city()},
        "readings": [
            {"t": int(_when(f).timestamp()), "temp": f.pyfloat(2, 1), "rh": f.random_int(0, 100)}
            for _ in range(f.random_int(1, 5))
        ],
        "firmware": f.numerify("v#.#.##"),
    }


def _calendar(f: Any) -> dict:
    start = _when(f)
    return {
        "event": f.catch_phrase(),
        "organizer": f.email(),
        "attendees": [f.name() for _ in range(f.random_int(1, 5))],
        "start": start.isoformat(),
        "minutes": f.random_element((15, 30, 45, 60, 90)),
        "room": f.bothify("Room ##?"),
        "notes": f.text(160),
    }


JSON_SCHEMAS: dict[Split, dict[str, Callable[[Any], dict]]] = {
    "train": {"user": _user, "order": _order, "tool_call": _tool_call},
    "eval": {"ticket": _ticket, "sensor": _sensor, "calendar": _calendar},
}


# ---- log lines --------------------------------------------------------------------------------


def _syslog(f: Any) -> str:
    stamp = _when(f).strftime("%b %d %H:%M:%S")
    daemon = f.random_element(("sshd", "cron", "kernel", "systemd", "dhclient", "postfix/smtpd"))
    return f"{stamp} {f.hostname()} {daemon}[{f.random_int(100, 99999)}]: {f.sentence()}"


def _python_logging(f: Any) -> str:
    stamp = _when(f).strftime("%Y-%m-%d %H:%M:%S")
    level = f.random_element(("DEBUG", "INFO", "INFO", "WARNING", "ERROR"))
    module = ".".join(f.words(f.random_int(1, 3)))
    return f"{stamp},{f.random_int(0, 999):03d} {level} {module}: {f.sentence()}"


def _access_log(f: Any) -> str:
    stamp = _when(f).strftime("%d/%b/%Y:%H:%M:%S +0000")
    method = f.random_element(("GET", "GET", "POST", "PUT", "DELETE"))
    status = f.random_element((200, 200, 201, 204, 301, 404, 500))
    return (
        f'{f.ipv4()} - - [{stamp}] "{method} {f.uri_path()} HTTP/1.1" {status} '
        f'{f.random_int(0, 99999)} "{f.url()}" "{f.user_agent()}"'
    )


def _klog(f: Any) -> str:
    t = _when(f)
    level = f.random_element(("I", "I", "W", "E"))
    source = f"{f.word()}.go:{f.random_int(10, 999)}"
    return (
        f"{level}{t.strftime('%m%d %H:%M:%S')}.{f.random_int(0, 999999):06d} "
        f"{f.random_int(1, 9999):>6} {source}] {f.sentence()} {f.word()}={f.random_int(0, 999)}"
    )


LOG_FORMATS: dict[Split, dict[str, Callable[[Any], str]]] = {
    "train": {"syslog": _syslog, "python": _python_logging},
    "eval": {"access": _access_log, "klog": _klog},
}


# ---- documents --------------------------------------------------------------------------------


def _render(kind: str, family: str, split: Split, fake: Any) -> str:
    if kind == "json":
        make = JSON_SCHEMAS[split][family]
        records = [make(fake) for _ in range(RECORDS_PER_DOCUMENT)]
        if fake.boolean():  # JSON lines or one pretty-printed array
            return "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"
        return json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    line = LOG_FORMATS[split][family]
    return "\n".join(line(fake) for _ in range(RECORDS_PER_DOCUMENT * 4)) + "\n"


def documents(kind: str) -> Iterator[Document]:
    """DOCUMENTS_PER_FAMILY documents of every family of `kind` ("json" or "logs")."""
    families = JSON_SCHEMAS if kind == "json" else LOG_FORMATS
    for split in ("train", "eval"):
        for family in families[split]:
            for i in range(DOCUMENTS_PER_FAMILY):
                locale = LOCALES[split][i % len(LOCALES[split])]
                doc_id = f"{kind}/{family}/{locale}/{i}"

                def read(doc_id=doc_id, family=family, split=split, locale=locale) -> str:
                    fake = _faker(locale)
                    fake.seed_instance(_seed(doc_id))
                    return _render(kind, family, split, fake)

                yield Document(doc_id, split, read)  # type: ignore[arg-type]

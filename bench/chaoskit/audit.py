"""The audit: acknowledged writes against the database's own rows (lost, duplicated, out of order)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

from app.dispatch.notifications import CREATE, MARK_READ, MARK_UNREAD
from bench.chaoskit.config import CALLER
from bench.chaoskit.urls import admin_connect
from brownout._dispatch.envelope import caller_scope, command_id_for

ACK = (200, 201, 202)


def command_id_of(write: dict[str, Any]) -> str:
    if write["kind"] == "create":
        return str(command_id_for(CREATE, caller_scope(f"user:{write['user']}", CALLER), write["key"]))
    name = MARK_READ if write["kind"] == "read" else MARK_UNREAD
    return str(command_id_for(name, caller_scope(f"notification:{write['nid']}", CALLER), write["key"]))


def audit_writes(
    mode: str,
    writes: list[dict[str, Any]],
    requests: list[list[Any]],
    *,
    rows: dict[str, tuple[bool, int, str]],
    applied: dict[str, tuple[str, str, int, int, str, str]],
    duplicate_subjects: dict[str, int],
    duplicate_outbox: int = 0,
    duplicate_keys: int = 0,
    dead_letters: int = 0,
    conflicts: int = 0,
) -> dict[str, Any]:
    """Acknowledged writes against the database: lost, duplicated, out of order (see the module docstring)."""
    acked = [w for w in writes if w["status"] in ACK]
    lost: list[str] = []
    unacked_applied = 0
    mismatched_ids = 0
    row_subjects = {subject for _, _, subject in rows.values()}
    for write in writes:
        present = _present(mode, write, rows, row_subjects, applied)
        if write["status"] in ACK:
            if not present:
                lost.append(write["key"])
            if write["status"] == 202 and write.get("cid") and write["cid"] != command_id_of(write):
                mismatched_ids += 1
        elif present:
            unacked_applied += 1
    subjects = {f"chaos {w['key']}" for w in writes if w["kind"] == "create"}
    phantoms = len(row_subjects - subjects)
    duplicated = sum(n - 1 for n in duplicate_subjects.values()) + duplicate_outbox + duplicate_keys

    reordered, entities, superseded = _order(mode, writes, rows, applied)
    reads = [r for r in requests if r[3] in ("list", "get")]
    answered = sum(1 for r in reads if r[4] == 200)
    created_by = {w["id"]: w["status"] for w in writes if w["kind"] == "create" and w.get("id")}
    not_found = [r[6].split(" ")[0] for r in reads if r[4] == 404 and r[3] == "get"]
    return {
        "writes_sent": len(writes),
        "acknowledged": len(acked),
        "acknowledged_applied": sum(1 for w in acked if w["status"] in (200, 201)),
        "acknowledged_queued": sum(1 for w in acked if w["status"] == 202),
        "present": len(acked) - len(lost),
        "lost": len(lost),
        "lost_keys": lost,
        "duplicated": duplicated,
        "phantoms": phantoms,
        "reordered": reordered,
        "toggled_entities": entities,
        "superseded": superseded,
        "applied_via_queue": sum(1 for row in applied.values() if row[4] == "queued"),
        "unacknowledged_applied": unacked_applied,
        "command_id_mismatches": mismatched_ids,
        "rejected": sum(1 for w in writes if w["status"] == 503),
        "failed_writes": sum(1 for w in writes if w["status"] not in ACK and w["status"] != 503),
        "reads": len(reads),
        "reads_answered": answered,
        "reads_stale": sum(r[5] for r in reads),
        "reads_failed": len(reads) - answered,
        "reads_not_found": len(not_found),
        "reads_not_found_queued": sum(1 for ident in not_found if created_by.get(ident) == 202),
        "dead_letters": dead_letters,
        "conflicts": conflicts,
    }


def _present(
    mode: str, write: dict[str, Any], rows: dict[str, tuple[bool, int, str]], subjects: set[str], applied: dict[str, Any]
) -> bool:
    if mode == "brownout":
        found = command_id_of(write) in applied
        if write["kind"] == "create" and write.get("id"):
            found = found and write["id"] in rows
        return found
    if write["kind"] == "create":  # naive: the row exists (its id came back in the answer, or look for its subject)
        if write.get("id"):
            return write["id"] in rows
        return f"chaos {write['key']}" in subjects
    return write["status"] in ACK  # naive toggles leave no record of their own: judged by the final state (_order)


def _order(
    mode: str, writes: list[dict[str, Any]], rows: dict[str, tuple[bool, int, str]], applied: dict[str, Any]
) -> tuple[int, int, int]:
    """Per notification toggled: (entities out of order, entities toggled, superseded writes).

    Brownout: (1) among the acknowledged toggles of one notification, sent one after
    another, acceptance stamps increase; (2) in apply order (apply_seq), the writes
    that took effect have increasing stamps (a late, older one is `superseded`);
    (3) the row's final (read, read_stamp) is the one of the highest stamp applied.
    Naive: the final `read` is the value of the last acknowledged toggle (entities
    whose later toggle failed with an unknown outcome are left out)."""
    chains: dict[str, list[dict[str, Any]]] = {}
    for write in sorted(writes, key=lambda w: w["t"]):  # one toggle in flight per notification: send order
        if write["kind"] != "create":
            chains.setdefault(write["nid"], []).append(write)
    bad: set[str] = set()
    superseded = 0
    if mode == "brownout":
        by_entity: dict[str, list[tuple[int, int, str, str]]] = {}
        for _cid, (name, entity_key, stamp, seq, _path, outcome) in applied.items():
            if name in (MARK_READ, MARK_UNREAD):
                by_entity.setdefault(entity_key.partition(":")[2], []).append((seq, stamp, name, outcome))
        for nid, chain in chains.items():
            stamps = [applied[command_id_of(w)][2] for w in chain if w["status"] in ACK and command_id_of(w) in applied]
            if any(b <= a for a, b in pairwise(stamps)):
                bad.add(nid)
        for nid, entries in by_entity.items():
            entries.sort()
            superseded += sum(1 for e in entries if e[3] == "superseded")
            effective = [stamp for _seq, stamp, _name, outcome in entries if outcome == "applied"]
            if any(b <= a for a, b in pairwise(effective)):
                bad.add(nid)
            _seq, top_stamp, top_name, _outcome = max(entries, key=lambda e: e[1])
            row = rows.get(nid)
            if row is None or row[0] != (top_name == MARK_READ) or row[1] != top_stamp:
                bad.add(nid)
    else:
        for nid, chain in chains.items():
            last_ack = max((i for i, w in enumerate(chain) if w["status"] in ACK), default=None)
            if last_ack is None or any(w["status"] not in ACK for w in chain[last_ack + 1 :]):
                continue
            row = rows.get(nid)
            if row is None or row[0] != chain[last_ack]["value"]:
                bad.add(nid)
    return len(bad), len(chains), superseded


def audit_database(
    admin_url: str, dbname: str, mode: str, writes: list[dict[str, Any]], requests: list[list[Any]]
) -> dict[str, Any]:
    """The run's rows, read over the harness's own link (not through the proxies), judged by audit_writes."""
    conn = admin_connect(admin_url, dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT id::text, read, read_stamp, subject FROM notifications")
            rows = {ident: (read, stamp, subject) for ident, read, stamp, subject in cur.fetchall()}
            cur.execute("SELECT subject, count(*) FROM notifications GROUP BY subject HAVING count(*) > 1")
            duplicate_subjects = {subject: n for subject, n in cur.fetchall()}
            applied: dict[str, tuple[str, str, int, int, str, str]] = {}
            dead_letters = conflicts = duplicate_outbox = duplicate_keys = 0
            if mode == "brownout":
                cur.execute(
                    "SELECT command_id::text, name, entity_key, accepted_stamp, apply_seq, path, outcome FROM applied_commands"
                )
                applied = {row[0]: row[1:] for row in cur.fetchall()}
                cur.execute("SELECT count(*) FROM (SELECT 1 FROM outbox GROUP BY notification_id, kind HAVING count(*) > 1) d")
                duplicate_outbox = int(cur.fetchone()[0])
                cur.execute(
                    "SELECT count(*) FROM (SELECT 1 FROM applied_commands GROUP BY name, scope, idempotency_key"
                    " HAVING count(*) > 1) d"
                )
                duplicate_keys = int(cur.fetchone()[0])
                cur.execute("SELECT count(*) FROM dead_letters")
                dead_letters = int(cur.fetchone()[0])
                cur.execute("SELECT count(*) FROM command_conflicts")
                conflicts = int(cur.fetchone()[0])
    finally:
        conn.close()
    return audit_writes(
        mode,
        writes,
        requests,
        rows=rows,
        applied=applied,
        duplicate_subjects=duplicate_subjects,
        duplicate_outbox=duplicate_outbox,
        duplicate_keys=duplicate_keys,
        dead_letters=dead_letters,
        conflicts=conflicts,
    )

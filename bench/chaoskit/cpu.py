"""CPU seconds per group of processes, from /proc (Linux): who spent the machine during a run.

A group is a set of root processes and their descendants. A process's figure is its own time plus what
its reaped children spent; one that disappears keeps its last figure unless its parent is still in the
group (the parent's children time then holds it): PostgreSQL's backends come and go under the
postmaster, a killed worker is reaped by the harness."""

from __future__ import annotations

import os
from collections.abc import Callable

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_stat(pid: int) -> tuple[int, str, float, float] | None:
    """(parent pid, command name, own CPU seconds, reaped children's CPU seconds), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode(errors="replace")
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    # after the name: state ppid ... utime (index 11) stime cutime cstime
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return int(fields[1]), comm, (utime + stime) / TICKS, (cutime + cstime) / TICKS


def process_table() -> dict[int, tuple[int, str, float, float]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                table[int(name)] = stat
    return table


def descendants(table: dict[int, tuple[int, str, float, float]], roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def find_roots(table: dict[int, tuple[int, str, float, float]], comm: str, *, outside: int | None = None) -> set[int]:
    """The topmost processes named *comm* (a server's main process), leaving out those under *outside*."""
    named = {pid for pid, (_, name, *_rest) in table.items() if name == comm}
    excluded = descendants(table, {outside}) if outside is not None else set()
    return {pid for pid in named - excluded if table[pid][0] not in named}


class CpuGroups:
    """CPU seconds per named group, sampled now and then (sample()), monotonic across deaths."""

    def __init__(self, groups: dict[str, Callable[[dict[int, tuple[int, str, float, float]]], set[int]]]) -> None:
        self.groups = groups
        self._seen: dict[str, dict[int, tuple[int, float]]] = {name: {} for name in groups}  # pid -> (ppid, cpu)
        self._departed: dict[str, float] = dict.fromkeys(groups, 0.0)
        self.totals: dict[str, float] = dict.fromkeys(groups, 0.0)

    def sample(self) -> dict[str, float]:
        table = process_table()
        for name, roots_of in self.groups.items():
            members = descendants(table, roots_of(table))
            seen = self._seen[name]
            for pid in list(seen):
                if pid not in members:
                    ppid, cpu = seen.pop(pid)
                    if ppid not in members:  # nobody in the group reaps it: keep what it spent
                        self._departed[name] += cpu
            for pid in members:
                ppid, _, own, children = table[pid]
                seen[pid] = (ppid, own + children)
            self.totals[name] = self._departed[name] + sum(cpu for _, cpu in seen.values())
        return dict(self.totals)

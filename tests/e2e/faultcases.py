"""The fault matrix of issue 8: which fault, when, in which mode, and what must follow.

One source of truth for tests/e2e/test_fault_matrix.py (which runs the cases)
and `python -m scripts.devtools.faults` (which prints them as a table).

Outcomes (libvirt's rules): S = the guest runs on the source, D = it runs on
the dest, P = the source stays paused with a clear reason because the dest's
fate is unknown, LOST = no copy is left running and the error says why.

A phase is held at an exact point by a failpoint armed at run time
(`pause`, see workers/failpoints.py), the fault is inflicted, then the phase
is let go.  "Perform (copying)" needs no failpoint: the migration runs at
1 MiB/s and the fault lands once QEMU has sent data; in storage mode
(--copy-storage-all, each host its own disk file) it lands while the disks are
mirrored, before any RAM moves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Fault(enum.Enum):
    SRC_WORKER = "kill source worker"
    DST_WORKER = "kill dest worker"
    SRC_QEMU = "kill source QEMU"
    DST_QEMU = "kill dest QEMU"
    REDIS = "Redis restart"
    ABORT = "abort"
    TLS = "TLS refused"


class At(enum.Enum):
    BEGIN = "Begin"
    PREPARE = "Prepare"
    COPYING = "Perform (copying)"
    SWITCHED = "Perform (after switch-over)"
    FINISH = "Finish"
    STARTED = "Finish (dest CPUs started)"
    CONFIRM = "Confirm"


class Mode(enum.Enum):
    MANAGED = "managed"
    P2P = "p2p"
    TUNNELLED = "p2p tunnelled"
    STORAGE = "managed storage copy"


class Outcome(enum.Enum):
    S = "S"
    D = "D"
    P = "P"
    LOST = "lost"


SOURCE, DEST = "source", "dest"

# Where each phase is held: (the side whose worker runs the point, the failpoint).
POINTS: dict[At, tuple[str, str] | None] = {
    At.BEGIN: (SOURCE, "begin3.end"),
    At.PREPARE: (DEST, "prepare3.end"),
    At.COPYING: None,
    At.SWITCHED: (SOURCE, "perform3.after_migrate"),
    At.FINISH: (DEST, "finish3.start"),
    At.STARTED: (DEST, "finish3.after_cont"),
    At.CONFIRM: (SOURCE, "confirm3.start"),
}

S, D, P, LOST = Outcome.S, Outcome.D, Outcome.P, Outcome.LOST
_PHASES = list(At)

# The table, one row per fault, in the order of At.  Where ferry's
# answer differs from libvirt's, NOTES says why.
EXPECTED: dict[Fault, list[Outcome | None]] = {
    Fault.SRC_WORKER: [S, S, S, D, D, D, D],
    Fault.DST_WORKER: [D, S, D, D, S, D, D],
    Fault.SRC_QEMU: [LOST, LOST, LOST, D, D, D, D],
    Fault.DST_QEMU: [None, S, S, S, S, P, LOST],
    Fault.REDIS: [D, D, D, D, D, D, D],
    Fault.ABORT: [S, S, S, D, D, D, D],
}

NOTES: dict[tuple[Fault, At], str] = {
    (Fault.SRC_WORKER, At.PREPARE):
        "managed: the chain is with the dest; the restarted source worker marks the job "
        "cancelled (a source restarted before the switch-over rolls back) and Perform, "
        "when it comes, fails with that reason; p2p: the driving task died with the "
        "worker and the restarted worker cancels",
    (Fault.DST_WORKER, At.BEGIN):
        "the dest worker is idle during Begin; Prepare waits in its queue until it is "
        "back, so the migration goes on (D)",
    (Fault.DST_WORKER, At.COPYING):
        "direct: the data path goes on without the worker and the restarted worker finds "
        "its QEMU (D); tunnelled: the stream's receiving end lives in the dest worker, so "
        "its death ends the incoming QEMU, the source resumes (S) and the error says the "
        "restarted worker found that QEMU gone",
    (Fault.DST_WORKER, At.FINISH):
        "killed before the dest CPUs started: the restarted dest worker discards the "
        "incoming guest and the source resumes (S); killed after: it answers for Finish "
        "and Confirm follows (D)",
    (Fault.DST_QEMU, At.STARTED):
        "the dest ran the guest and may have written its disks, so the source is never "
        "resumed: it stays paused and the error says why (P)",
    (Fault.DST_QEMU, At.BEGIN): "not meaningful: no dest QEMU exists during Begin",
    (Fault.DST_QEMU, At.CONFIRM):
        "the guest already runs on the dest and the job completed; Confirm removes the "
        "source as planned, so the dest's crash loses the guest (its transient "
        "definition goes with its QEMU)",
    (Fault.REDIS, At.BEGIN):
        "the broker keeps its messages (append-only file), so every phase goes on (D; "
        "the issue's table has S for Begin and Prepare)",
    (Fault.REDIS, At.COPYING):
        "tunnelled: the stream itself flows through Redis, so a restart breaks it; the "
        "source resumes (S) and the error names the tunnel's lost connection",
    (Fault.ABORT, At.SWITCHED): "too late: QEMU completed, the migration goes on (D)",
    (Fault.ABORT, At.FINISH): "refused: the switch-over happened (also once the dest "
                              "CPUs started)",
    (Fault.ABORT, At.CONFIRM): "refused: the switch-over happened",
    (Fault.TLS, At.PREPARE):
        "a --tls migration into a dest whose server key is missing: Prepare refuses "
        "before its QEMU starts, naming the host and the file",
    (Fault.TLS, At.COPYING):
        "a --tls migration from a source whose client certificate the dest's CA did not "
        "sign: the dest refuses it in the handshake at the start of Perform (nothing is "
        "copied); the error is the dest's verdict",
}


@dataclass(frozen=True)
class Case:
    fault: Fault
    at: At
    mode: Mode
    expected: Outcome

    @property
    def id(self) -> str:
        return f"{self.mode.name.lower()}-{self.fault.name.lower()}-{self.at.name.lower()}"

    @property
    def point(self) -> tuple[str, str] | None:
        """Where the phase is held for the fault; TLS faults are in the certificates,
        set before the migration starts: nothing to hold."""
        return None if self.fault == Fault.TLS else POINTS[self.at]


# Tunnelled: the stream goes through the workers and Redis, so the faults that hit the
# data path while QEMU copies are run again in that mode.
TUNNELLED_EXPECTED: dict[tuple[Fault, At], Outcome] = {
    (Fault.SRC_WORKER, At.COPYING): S,
    (Fault.DST_WORKER, At.COPYING): S,
    (Fault.REDIS, At.COPYING): S,
}


# Storage copy: the faults that hit while the disks are mirrored to the dest's NBD
# server.  Beyond one copy running: the disk of the host where the guest runs holds every
# write it made, and a dest that lost the guest keeps no image it created but one
# recorded for a retry, until its keep time ends.
STORAGE_EXPECTED: dict[tuple[Fault, At], Outcome] = {
    (Fault.SRC_WORKER, At.COPYING): S,
    (Fault.DST_WORKER, At.COPYING): D,
    (Fault.SRC_QEMU, At.COPYING): LOST,
    (Fault.DST_QEMU, At.COPYING): S,
    (Fault.REDIS, At.COPYING): D,
    (Fault.ABORT, At.COPYING): S,
}
STORAGE_NOTE = (
    "managed storage copy / Perform (copying): the fault lands while the disks are "
    "mirrored; a restarted source worker cancels the mirrors and the migration (S); the "
    "dest's worker is not on the data path: the mirrors and the NBD server live in the "
    "QEMUs (D); a dest QEMU killed fails the copy with an I/O error (S), and the image "
    "the dest created goes; after a source worker restart or an abort the dest keeps "
    "the partial image for a retry (FERRY_STORAGE_RETRY_KEEP_S), then the sweeper "
    "removes it")

# TLS: a --tls migration whose certificates the dest refuses at Prepare (its own are
# broken) or in the handshake at the start of Perform (the source's are not trusted).
TLS_EXPECTED: dict[At, Outcome] = {At.PREPARE: S, At.COPYING: S}


def cases() -> list[Case]:
    out = []
    for mode in (Mode.MANAGED, Mode.P2P):
        for fault, row in EXPECTED.items():
            for at, expected in zip(_PHASES, row, strict=True):
                if expected is None:
                    continue
                out.append(Case(fault, at, mode, expected))
    out += [Case(Fault.TLS, at, mode, expected) for mode in (Mode.MANAGED, Mode.P2P)
            for at, expected in TLS_EXPECTED.items()]
    return out + [Case(fault, at, Mode.TUNNELLED, expected)
                  for (fault, at), expected in TUNNELLED_EXPECTED.items()] + \
        [Case(fault, at, Mode.STORAGE, expected)
         for (fault, at), expected in STORAGE_EXPECTED.items()]


@dataclass
class Result:
    case: str
    fault: str
    at: str
    mode: str
    expected: str
    actual: str
    settle_s: float
    error: str | None
    passed: bool


def markdown(results: list[Result]) -> str:
    """The matrix as a Markdown table, in case order, with the notes after it."""
    lines = ["| mode | fault | phase | expected | actual | settle (s) | error |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        actual = r.actual if r.passed else f"**{r.actual}** (failed)"
        error = (r.error or "").replace("|", "/")
        if len(error) > 90:
            error = error[:87] + "..."
        lines.append(f"| {r.mode} | {r.fault} | {r.at} | {r.expected} | {actual} | "
                     f"{r.settle_s:.1f} | {error} |")
    lines.append("")
    for (fault, at), note in NOTES.items():
        lines.append(f"- {fault.value} / {at.value}: {note}.")
    if any(r.mode == Mode.STORAGE.value for r in results):
        lines.append(f"- {STORAGE_NOTE}.")
    return "\n".join(lines) + "\n"


# --- protocol v2 -------------------------------------------------------------------------
# prepare2 -> perform2 -> finish2 (managed; p2p where marked), on hosts whose lock manager
# keeps no state.  Run by tests/e2e/test_v2_faults.py: the matrix above has no protocol
# axis.  v2 has no Confirm: Perform kills the source as soon as QEMU completed, so a
# fault in Finish loses the guest, as in libvirt, and the error must say so.  Every fault
# is a real one (QEMU refusing an option, a QEMU killed, a disk image whose lock another
# process holds, an operator's abort); failpoints only hold a phase still.


class V2Fault(enum.Enum):
    DST_START = "dest QEMU fails to start"
    DST_QEMU = "kill dest QEMU"
    SRC_QEMU = "kill source QEMU"
    DST_DISK_LOCKED = "dest disk locked by another process (cont fails)"
    ABORT = "abort"


V2_POINTS: dict[At, tuple[str, str] | None] = {
    At.PREPARE: (DEST, "prepare3.end"),
    At.COPYING: None,
    At.FINISH: (DEST, "finish3.start"),
}

V2_EXPECTED: dict[tuple[V2Fault, At], Outcome] = {
    (V2Fault.DST_START, At.PREPARE): S,
    (V2Fault.DST_QEMU, At.PREPARE): S,
    (V2Fault.ABORT, At.PREPARE): S,
    (V2Fault.DST_QEMU, At.COPYING): S,
    (V2Fault.SRC_QEMU, At.COPYING): LOST,
    (V2Fault.ABORT, At.COPYING): S,
    (V2Fault.DST_QEMU, At.FINISH): LOST,
    (V2Fault.DST_DISK_LOCKED, At.FINISH): LOST,
    (V2Fault.ABORT, At.FINISH): D,
}

#: what the job's error must say, by fault (None: the job completes)
V2_ERRORS: dict[V2Fault, str | None] = {
    V2Fault.DST_START: r"prepare.*QEMU failed to start.*ferry-failpoint-bad-option",
    V2Fault.DST_QEMU: r"perform2|finish2",
    V2Fault.SRC_QEMU: r"perform2.*QEMU of .* exited",
    V2Fault.DST_DISK_LOCKED: r"finish2.*lock",
    V2Fault.ABORT: r"perform2.*abort",
}


@dataclass(frozen=True)
class V2Case:
    fault: V2Fault
    at: At
    expected: Outcome
    p2p: bool = False

    @property
    def id(self) -> str:
        mode = "p2p" if self.p2p else "managed"
        return f"v2-{mode}-{self.fault.name.lower()}-{self.at.name.lower()}"

    @property
    def point(self) -> tuple[str, str] | None:
        return V2_POINTS[self.at]


def v2_cases() -> list[V2Case]:
    """Every v2 row managed; the Perform abort and the Finish kill also peer-to-peer."""
    out = [V2Case(fault, at, expected) for (fault, at), expected in V2_EXPECTED.items()]
    return out + [V2Case(f, a, V2_EXPECTED[(f, a)], p2p=True)
                  for f, a in ((V2Fault.ABORT, At.COPYING), (V2Fault.DST_QEMU, At.FINISH))]

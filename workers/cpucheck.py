"""Can this host run the guest's CPU?  Asked before QEMU starts (start, Prepare, restore).

Why before: QEMU's ``enforce`` (which ferry adds to every custom model) would
refuse to start anyway, but a Prepare that fails that way has already made taps
and reserved ports, and QEMU's message names CPUID bits, not libvirt's feature
names.  So the host asks its QEMU once (per emulator and accelerator, cached):
``query-cpu-definitions`` lists, for the accelerator the guest will use, the
features each named model would lack here (``unavailable-features``);
``query-cpu-model-expansion`` gives the features of the host CPU (``host`` under
KVM, ``max`` under TCG) and, for FERRY_CPU_HIDE_FEATURES, the features each model
is made of.  The guest is refused, naming the missing features, when its model
lacks any here, when a feature it requires is missing or hidden, or when a
feature it forbids is present.

FERRY_CPU_HIDE_FEATURES is how a pool is kept to a common baseline (the new
host with avx512 runs nothing that would need it elsewhere) and how tests give
one of two hosts on a machine a CPU that lacks something.  It does not mask
host-passthrough guests (they see the host CPU as it is); a host-model guest is
expanded without the hidden features (workers/cpumodel.py).
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from workers.domain import DomainDef
from workers.errors import QemuError, UnsupportedError


def norm(feature: str) -> str:
    """QEMU spells features sse4.2, sse4_2, lahf_lm or lahf-lm: one spelling to compare."""
    return feature.replace("_", "-").replace(".", "-")


@dataclass(frozen=True)
class CpuCaps:
    """What one QEMU offers under one accelerator (QEMU's spelling; `host` normalised)."""

    accel: str
    unavailable: dict[str, frozenset[str]]  # model -> features it would lack here
    host: frozenset[str]  # features of the host CPU (KVM) or of max (TCG), normalised
    models: dict[str, frozenset[str]]  # model -> its features (the models asked about)


def cpu_problems(d: DomainDef, caps: CpuCaps, hidden: Iterable[str] = ()) -> list[str]:
    """Why `d`'s CPU cannot run here; [] when it can.  Pure: unit-tested on literal caps."""
    hide = {norm(f) for f in hidden}
    out: list[str] = []
    if d.cpu_mode == "custom" and d.cpu_model:
        model = d.cpu_model
        if model not in caps.unavailable:
            return [f"cpu model '{model}' is unknown to this QEMU"]
        made_of = {norm(f) for f in caps.models.get(model, ())}
        lacks = sorted(set(caps.unavailable[model]) | {h for h in hidden if norm(h) in made_of})
        if lacks:
            out.append(f"cpu model '{model}' needs {', '.join(lacks)}, which this host "
                       "lacks" + (" (or hides: FERRY_CPU_HIDE_FEATURES)" if hide else ""))
    need = sorted(f.name for f in d.cpu_features
                  if f.on and (norm(f.name) not in caps.host or norm(f.name) in hide))
    if need:
        out.append(f"cpu features {', '.join(need)} are required but this host lacks them")
    forbidden = sorted(f.name for f in d.cpu_features
                       if f.policy == "forbid" and norm(f.name) in caps.host - hide)
    if forbidden:
        out.append(f"cpu features {', '.join(forbidden)} are forbidden but this host has them")
    return out


def needs_check(d: DomainDef) -> bool:
    return d.cpu_mode == "custom" or bool(d.cpu_features)


def check_cpu(d: DomainDef, caps: CpuCaps, hidden: Iterable[str], host: str) -> None:
    problems = cpu_problems(d, caps, hidden)
    if problems:
        raise UnsupportedError(f"the CPU of '{d.name}' cannot run here: "
                               f"{'; '.join(problems)}", host=host)


def ask_qemu(emulator: str, accel: str, cmds: list[dict[str, object]]) -> list[object]:
    """The answers of `emulator` (``-machine none``, QMP on stdio, under `accel`) to
    `cmds`, in order (an error answers None)."""
    lines = [{"execute": "qmp_capabilities"}, *cmds, {"execute": "quit"}]
    text = "".join(json.dumps(c) + "\n" for c in lines)
    argv = [emulator, "-machine", f"none,accel={accel}", "-nodefaults", "-display", "none",
            "-qmp", "stdio"]
    try:
        done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuError(f"cannot ask {emulator} about its CPU models", cause=str(exc)) from None
    replies = [json.loads(line) for line in done.stdout.splitlines()
               if line.startswith("{") and ('"return"' in line or '"error"' in line)]
    answers = [r.get("return") for r in replies[1:]]  # [0] is qmp_capabilities' {}
    if len(answers) < len(cmds):
        raise QemuError(f"{emulator} did not describe its CPU models under {accel}",
                        cause=done.stderr.strip()[-300:])
    return answers[:len(cmds)]


def expansion(kind: str, model: str) -> dict[str, object]:
    return {"execute": "query-cpu-model-expansion",
            "arguments": {"type": kind, "model": {"name": model}}}


def props_of(answer: object) -> dict[str, object]:
    """The properties of a query-cpu-model-expansion answer ({} for an error)."""
    model = answer.get("model", {}) if isinstance(answer, dict) else {}
    props = model.get("props", {}) if isinstance(model, dict) else {}
    return props if isinstance(props, dict) else {}


@functools.lru_cache(maxsize=16)
def probe(emulator: str, accel: str, models: tuple[str, ...]) -> CpuCaps:
    """Ask `emulator` (``-machine none``, QMP on stdio) under `accel` (kvm or tcg)."""
    base = "host" if accel == "kvm" else "max"
    cmds: list[dict[str, object]] = [{"execute": "query-cpu-definitions"},
                                     expansion("full", base)]
    cmds += [expansion("static", m) for m in models]
    answers = ask_qemu(emulator, accel, cmds)
    definitions = answers[0]
    if not isinstance(definitions, list):
        raise QemuError(f"{emulator} did not list its CPU models under {accel}")
    unavailable = {d["name"]: frozenset(d.get("unavailable-features", ())) for d in definitions}
    host = frozenset(norm(k) for k, v in props_of(answers[1]).items() if v is True)
    feats = {}
    for model, answer in zip(models, answers[2:], strict=False):
        feats[model] = frozenset(k for k, v in props_of(answer).items() if v is True)
    return CpuCaps(accel, unavailable, host, feats)

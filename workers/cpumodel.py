"""host-model as libvirt runs it: the host's CPU expanded to a named model plus features.

Why expand: a guest started as ``-cpu host`` (or ``max``) sees whatever the host
has, so it can only move to an identical CPU.  libvirt instead turns host-model,
when the guest starts, into ``mode='custom'``: the named model closest to the
host's CPU and the features the host has beyond it (virCPUUpdate).  The running
guest's definition then says exactly which CPU it sees; the source sends that
definition, so Prepare's CPU check (workers/cpucheck.py) asks the dest about a
concrete model and features, and a host-model guest moves between different CPUs
that can both run it, without --unsafe.  The persistent definition keeps
host-model: a later cold start expands it again on whatever host it runs.

What is expanded: QEMU's ``host`` model under KVM and, under TCG (which has no
``host``), ``max``, the CPU TCG emulates with everything it can; this is what
libvirt probes for host-model under each accelerator
(``query-cpu-model-expansion``, type static: the features by their canonical
QEMU names).  The named model is chosen among the models this QEMU can run here
unchanged (no ``unavailable-features``), concrete versions only (``Nehalem-v1``,
not the machine-dependent alias ``Nehalem``), of the host's vendor, whose
features the host all has: the one with the most features (ties: by name).
Features FERRY_CPU_HIDE_FEATURES hides are left out, so a pool kept to a
baseline gives its host-model guests only the baseline.  The guest's own
``<feature>`` elements of a host-model CPU apply on top (a disabled one is not
added).

A host-model definition that arrives unexpanded (an incoming migration or a
restore from an older ferry) is run as before, as the host's CPU: its source ran
it that way, and expanding it here could change the CPU under the guest.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace

from workers.cpucheck import ask_qemu, expansion, norm, props_of
from workers.devices import CpuFeature
from workers.domain import DomainDef
from workers.errors import UnsupportedError

_NOT_MODELS = ("host", "max", "base")


@dataclass(frozen=True)
class CpuModel:
    """A CPU model QEMU can run here: its vendor and its features (QEMU's names)."""

    name: str
    vendor: str
    features: frozenset[str]


@dataclass(frozen=True)
class HostCpu:
    """The host's CPU (``host`` under KVM, ``max`` under TCG) and the models it runs."""

    vendor: str
    features: frozenset[str]
    models: tuple[CpuModel, ...]


def best_model(host: HostCpu, hidden: Iterable[str] = ()) -> CpuModel:
    """The named model closest to `host` less `hidden`: libvirt's choice, see above."""
    have = {norm(f) for f in host.features} - {norm(h) for h in hidden}
    fits = [m for m in host.models if m.vendor == host.vendor
            and all(norm(f) in have for f in m.features)]
    if not fits:
        raise UnsupportedError(f"cpu mode 'host-model': no CPU model of this QEMU fits this "
                               f"host's {host.vendor} CPU")
    return min(fits, key=lambda m: (-len(m.features), m.name))


def expand_host_model(d: DomainDef, host: HostCpu, hidden: Iterable[str] = ()) -> DomainDef:
    """`d` with its host-model CPU as mode custom: the closest model, the host's other
    features required, then the guest's own features.  Pure: unit-tested on literal XML."""
    if d.cpu_mode != "host-model":
        return d
    hidden = tuple(hidden)
    model = best_model(host, hidden)
    hide = {norm(h) for h in hidden}
    own = {norm(f.name) for f in d.cpu_features}
    inside = {norm(f) for f in model.features}
    extra = sorted(f for f in host.features
                   if norm(f) not in inside | hide | own)
    feats = (*(CpuFeature(name=f) for f in extra), *d.cpu_features)
    return replace(d, cpu_mode="custom", cpu_model=model.name, cpu_features=feats)


def with_running_cpu(target: DomainDef, running: DomainDef) -> DomainDef:
    """A target definition (``--xml``) that says host-model, for a guest running with its
    host-model expanded: the running CPU, which is what the guest sees (libvirt's ABI
    check is made against the expansion too).  The target's own features must be among
    the running ones, else it is left as it is and the ABI check names the difference."""
    if target.cpu_mode != "host-model" or running.cpu_mode != "custom":
        return target
    if not set(target.cpu_features) <= set(running.cpu_features):
        return target
    return replace(target, cpu_mode="custom", cpu_model=running.cpu_model,
                   cpu_features=running.cpu_features)


@functools.lru_cache(maxsize=8)
def probe_host(emulator: str, accel: str) -> HostCpu:
    """Ask `emulator` under `accel` for its host CPU and the models it runs unchanged."""
    base = "host" if accel == "kvm" else "max"
    first = ask_qemu(emulator, accel, [{"execute": "query-cpu-definitions"},
                                       expansion("static", base)])
    definitions = first[0] if isinstance(first[0], list) else []
    names = sorted(d["name"] for d in definitions
                   if not d.get("unavailable-features") and not d.get("alias-of")
                   and d["name"] not in _NOT_MODELS)
    answers = ask_qemu(emulator, accel, [expansion("static", n) for n in names]) if names else []
    return HostCpu(_vendor(first[1]), _features(first[1]),
                   tuple(CpuModel(n, _vendor(a), _features(a))
                         for n, a in zip(names, answers, strict=True)))


def _vendor(answer: object) -> str:
    return str(props_of(answer).get("vendor", ""))


def _features(answer: object) -> frozenset[str]:
    return frozenset(k for k, v in props_of(answer).items() if v is True)


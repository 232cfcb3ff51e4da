"""Host files a guest needs before QEMU starts: its UEFI NVRAM and its channel sockets' dir.

The NVRAM is the guest's own copy of the firmware's variable store.  libvirt
makes it from the template on first start and keeps it beside the guest; so does
ferry, in FERRY_NVRAM_DIR (default <state-dir>/nvram) when the definition names
no file, and the path is written into the definition at define time.

The flash's contents travel with the RAM: on the dest QEMU writes the whole
migrated variable store into the file it opened when the guest first changes
run state (pflash's post-load).  So a storage copy (the guest's files are the
source host's own) brings its NVRAM the way libvirt does: Prepare makes the
file from the template and QEMU fills it (storage_dest.py).  Without a storage
copy the file must already be there, on storage both hosts see: ferry refuses
rather than guess that the hosts do not share it.  The copy is written to a
temporary name and renamed, so no half-written NVRAM is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from workers.domain import AUTO_CHANNEL_DIR, DomainDef
from workers.errors import InvalidInputError


def with_nvram_path(d: DomainDef, nvram_dir: Path) -> DomainDef:
    """`d` with its NVRAM path filled in (libvirt's <name>_VARS.fd) when it has none."""
    fw = d.firmware
    if fw is None or fw.nvram is not None:
        return d
    return replace(d, firmware=replace(fw, nvram=str(nvram_dir / f"{d.name}_VARS.fd")))


def ensure_nvram(d: DomainDef, *, incoming: bool, host: str) -> None:
    """The NVRAM file exists: made from the template on a first start; an incoming
    guest's must be there already."""
    fw = d.firmware
    if fw is None or fw.nvram is None:
        return
    nvram = Path(fw.nvram)
    if nvram.exists():
        return
    if incoming:
        raise InvalidInputError(f"NVRAM {nvram} of '{d.name}' does not exist here: it must be "
                                "on storage the source host shares, or come with a storage "
                                "copy (--copy-storage-all or --copy-storage-inc)", host=host)
    make_nvram(d, host)


def missing_nvram(d: DomainDef) -> Path | None:
    """The guest's NVRAM path when it has one and no file is there."""
    fw = d.firmware
    if fw is None or fw.nvram is None or os.path.lexists(fw.nvram):
        return None
    return Path(fw.nvram)


def make_nvram(d: DomainDef, host: str) -> Path:
    """The guest's NVRAM file made from its template; returns its path."""
    assert d.firmware is not None and d.firmware.nvram is not None
    fw, nvram = d.firmware, Path(d.firmware.nvram)
    template = Path(fw.default_template())
    if not template.is_file():
        raise InvalidInputError(f"NVRAM template {template} of '{d.name}' does not exist",
                                host=host)
    nvram.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{nvram.name}.", dir=nvram.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(template, "rb") as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, nvram)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return nvram


def channel_dir(run: Path) -> str:
    """Where the host puts channel sockets a definition does not place (made 0700)."""
    path = run / AUTO_CHANNEL_DIR
    path.mkdir(mode=0o700, exist_ok=True)
    return str(run)

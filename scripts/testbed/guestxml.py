"""Domain XML for the test guest (scripts/testbed/guestimage.py), for tests and the demo.

kvmclock is off: SeaBIOS enables it, and KVM then rewrites its time page in
guest memory on the dest of a migration, so the memory identity checks
would see one page differ for reasons outside ferry.
"""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path


def guest_xml(name: str, disk: Path, serial_log: Path, *, memory_mib: int = 64,
              vcpus: int = 1, uuid: str | None = None, disk_bus: str = "ide",
              extra_devices: str = "", domain_type: str = "kvm", disk_format: str = "raw",
              kvmclock: bool = False) -> str:
    """`kvmclock=True` leaves QEMU's paravirtual clock on (memory checks: see above)."""
    target = {"virtio": "vda", "scsi": "sda"}.get(disk_bus, "hda")
    timers = "" if kvmclock else "\n    <timer name='kvmclock' present='no'/>"
    return f"""<domain type='{domain_type}'>
  <name>{name}</name>
  <uuid>{uuid or uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <clock offset='utc'>{timers}
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{disk_format}'/>
      <source file='{disk}'/>
      <target dev='{target}' bus='{disk_bus}'/>
    </disk>
    <serial type='file'>
      <source path='{serial_log}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>{extra_devices}
  </devices>
</domain>
"""

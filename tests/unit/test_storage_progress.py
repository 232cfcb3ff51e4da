"""Disk figures in the operator's view: domjobinfo's disk_* and data_* (libvirt's sums)."""

from __future__ import annotations

from workers.jobs import jobinfo_view
from workers.migration.progress import ProgressTracker


def test_domjobinfo_shows_disk_figures_and_data_as_memory_plus_disks() -> None:
    record = {"id": "j", "kind": "migration", "phase": "perform3", "source": "alpha",
              "dest": "beta", "started": 100.0, "progress": {
                  "memory_total": 1000, "memory_processed": 400, "memory_remaining": 600,
                  "disk_total": 5000, "disk_processed": 5000, "disk_remaining": 0,
                  "disk_bps": 77}}
    view = jobinfo_view(record, "alpha", now=101.0)
    assert (view["data_total"], view["data_processed"], view["data_remaining"]) == (
        6000, 5400, 600)
    assert (view["disk_total"], view["disk_processed"], view["disk_remaining"],
            view["disk_bps"]) == (5000, 5000, 0, 77)


def test_while_only_the_disks_move_data_is_the_disks() -> None:
    record = {"id": "j", "kind": "migration", "phase": "perform3", "source": "alpha",
              "started": 100.0, "progress": {"disk_total": 10, "disk_processed": 4,
                                             "disk_remaining": 6}}
    view = jobinfo_view(record, "alpha", now=101.0)
    assert (view["data_total"], view["data_processed"], view["data_remaining"]) == (10, 4, 6)


def test_a_migration_without_disks_keeps_its_memory_figures_and_no_disk_ones() -> None:
    record = {"id": "j", "kind": "migration", "phase": "perform3", "source": "alpha",
              "started": 100.0, "progress": {"memory_total": 10, "memory_processed": 4,
                                             "memory_remaining": 6}}
    view = jobinfo_view(record, "alpha", now=101.0)
    assert (view["data_total"], view["disk_total"], view["disk_bps"]) == (10, None, None)


def test_the_percentage_counts_the_disks_and_never_goes_back_when_the_ram_starts() -> None:
    t = ProgressTracker()
    first = t.update({"status": "copying-disks", "disk_total": 100, "disk_remaining": 50,
                      "disk_bps": 10}, 1.0)
    assert first["percent"] == 50.0 and first["eta_s"] == 5.0
    ram = t.update({"status": "active", "memory_total": 900, "memory_remaining": 900,
                    "disk_total": 100, "disk_remaining": 0}, 2.0)
    assert ram["percent"] == 50.0  # 10% by the sums, but it never goes back

"""Migration: parameters, phases and the QEMU-level data move."""

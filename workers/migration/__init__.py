"""Migration: the phases' logic on each host and the QEMU-level data move.

params.py        what the caller asked for (flags, URIs), checked
chain_state.py   what travels down a chain from phase to phase
cookie.py        libvirt's <qemu-migration> cookie codec
source.py        Begin, Perform, Confirm (and v2's Perform) on the source
dest.py          Prepare and Finish on the destination
guards.py        rules both ends share (abort at a boundary, v2 and leases, end a job)
qemu_migrate.py  QEMU's side: capabilities, migrate, the wait loop, statistics
progress.py      progress figures, the downtime schedule, stall watch
stream_caps.py   what the stream asks of each QEMU (multifd, compression, return path)
stream_stats.py  the stream's own figures: channels, compression, bytes, the guest's pause
tunnel.py        a tunnelled stream through the broker: one channel's pumps
tunnel_ends.py   each side's pumps as one tunnel (socketpair, or parallel unix channels)
tunnel_wire.py   the pumps' RESP on a raw socket; tunnel_splice.py: their zero-copy moves
storage_plan.py  storage copy policy: which disks, what the dest creates, mirror figures
storage.py       storage copy on the source: Begin's disks, the mirrors, switch-over, abort
storage_dest.py  storage copy on the dest: images (and their ledger), the NBD server
tls.py           native TLS: tls-creds objects, the host's policy, TLS failures in words
"""

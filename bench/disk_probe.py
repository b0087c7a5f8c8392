#!/usr/bin/env python3
"""Sequential write rate of the disk under DIR, printed as one JSON line.

Writes SIZE_MIB MiB of random bytes in 1 MiB chunks to a fresh file, then one
fdatasync; the timed window runs from the first write to the end of that
fdatasync, so the rate is what reaches the disk, not the page cache.

usage: disk_probe.py [size_mib=256] [dir=.]
"""
import json
import os
import sys
import time

size_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
target_dir = sys.argv[2] if len(sys.argv) > 2 else "."
chunk = os.urandom(1 << 20)  # random so that no compressing/deduplicating layer can shortcut it
path = os.path.join(target_dir, f"disk-probe-{os.getpid()}.dat")

os.sync()  # flush anything else that is dirty so it is not billed to this run
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    t0 = time.perf_counter()
    for _ in range(size_mib):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]
    t1 = time.perf_counter()
    os.fdatasync(fd)
    t2 = time.perf_counter()
finally:
    os.close(fd)
    os.unlink(path)

total = t2 - t0
nbytes = size_mib << 20
print(json.dumps({
    "test": "seq-write",
    "size_mib": size_mib,
    "chunk_kib": 1024,
    "secs": round(total, 3),
    "write_secs": round(t1 - t0, 3),
    "fdatasync_secs": round(t2 - t1, 3),
    "MB_per_s": round(nbytes / total / 1e6, 1),
    "MiB_per_s": round(nbytes / total / (1 << 20), 1),
}))

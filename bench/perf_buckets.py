#!/usr/bin/env python3
"""Groups a `perf record` profile of the hub by where the CPU goes.

usage: bench/perf_buckets.py perf.data [more.data ...]

Each sample's symbol is put in the first bucket whose pattern matches it (kernel
symbols first, then user space); the shares are of all samples. Record with, e.g.:
    perf record -F 999 -g -p "$(pidof hub)" -o perf.data -- sleep 8
"""
import collections
import re
import subprocess
import sys

BUCKETS = [
    ("kernel: disk write + fdatasync",
     r"\[k\].*(ext4|jbd2|blk_|bio|iowrite|folio|io_schedule|fsync|writepages|dd_|submit|nvme|virtblk|bit_wait|buffer)"),
    ("kernel: scheduling, futex, wake-ups",
     r"\[k\].*(sched|switch|futex|wake|idle|hrtimer|timer|spin_unlock|irq|softirq)"),
    ("kernel: TCP and socket calls",
     r"\[k\].*(tcp|sock|skb|inet|ip_|net_|napi|dev_|copy_|_iter|recv|send|loopback|rcv|ack|epoll|sys_|syscall|fdget|poll)"),
    ("kernel: other", r"\[k\]"),
    ("malloc / free / memcpy",
     r"(malloc|free|_int_|memmove|memcpy|memcmp|unlink_chunk|consolidate|realloc|cfree|__rdl_|__rust_alloc|__rust_dealloc|mi_|_mi_)"),
    ("JSON encoding", r"serde"),
    ("CRC", r"crc32"),
    ("MQTT codec", r"mqttbytes"),
    ("tokio runtime, channels, futures",
     r"(tokio|futures|mio|waker|Waker|oneshot|mpsc|Semaphore|semaphore|Notify|notify)"),
    ("clock reads and time formatting", r"(clock_gettime|vdso|\btime::|SystemTime|Instant)"),
    ("hub: telemetry", r"hub::telemetry"),
    ("hub: gateway", r"hub::gateway|accept_loop"),
    ("hub: other", r"hub::"),
]


def buckets(path):
    report = subprocess.run(
        ["perf", "report", "-i", path, "--no-children", "--sort", "dso,symbol",
         "-g", "none", "--stdio"],
        capture_output=True, text=True, check=True).stdout
    shares = collections.Counter()
    for line in report.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S+)\s+(.*)", line)
        if not m:
            continue
        share, symbol = float(m.group(1)), m.group(2) + " " + m.group(3)
        name = next((n for n, rx in BUCKETS if re.search(rx, symbol)), "other")
        shares[name] += share
    return shares


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        print(path)
        for name, share in buckets(path).most_common():
            print(f"  {share:5.1f} %  {name}")


if __name__ == "__main__":
    main()

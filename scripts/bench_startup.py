"""How fast the CLI answers when it has nothing to compute: --help, a subcommand's help, config errors.

Runs each command REPEAT times in a fresh `python -m lmcx` process and prints the median wall time, and
once more under -X importtime to say whether torch was imported. CPU s (user + system, median) depends
less on other load than wall time does; the load average is printed too. The target (issue 16): well
under 1 s, no torch.

  python scripts/bench_startup.py [REPEAT]     (default 5)
"""
from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEAT = int(sys.argv[1]) if len(sys.argv) > 1 else 5


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    (tmp / "broken.yaml").write_text("train: {lr: [\n")
    (tmp / "unknown.yaml").write_text("train: {nope: 1}\n")
    commands = [["--help"], ["train", "--help"], ["interpolate", "--help"],
                ["train", "-c", str(tmp / "broken.yaml")], ["train", "-c", str(tmp / "unknown.yaml")],
                ["run", str(tmp / "unknown.yaml")], ["match", "--a", "x", "--b", "y", "--set", "max_iter=0"]]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'command':<48} {'median s':>9} {'min s':>7} {'CPU s':>7}  torch imported")
    for args in commands:
        times, cpu = [], []
        for _ in range(REPEAT):
            used, started = _children_cpu(), time.perf_counter()
            subprocess.run([sys.executable, "-m", "lmcx", *args], capture_output=True)
            times.append(time.perf_counter() - started)
            cpu.append(_children_cpu() - used)
        traced = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmcx", *args], capture_output=True, text=True)
        torch_loaded = any(re.search(r"\|\s+torch$", line.rstrip()) for line in traced.stderr.splitlines())
        print(f"lmcx {' '.join(args).replace(str(tmp) + '/', ''):<43} {statistics.median(times):9.3f} "
              f"{min(times):7.3f} {statistics.median(cpu):7.3f}  {'yes' if torch_loaded else 'no'}")


if __name__ == "__main__":
    main()

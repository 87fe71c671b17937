"""Run every example of README.md, in order, in a fresh clone; then every example of `lmcx CMD --help`.

  python scripts/readme_examples.py [--work DIR] [--shared DIR]

Clones the repository's committed HEAD into DIR/clone (default: a new temporary folder), links DIR/shared
to the offline datasets (--shared, default ../shared beside this repository) so that the README's
`../shared` paths hold, and runs there, with this Python's environment (no install: `lmcx` is
`python -m lmcx` on the clone's code):
  - every command line of the README's ```bash blocks and every ```python block, in order; the few that
    need what a 2-core machine without network or GPU cannot give are run in a smaller form or skipped,
    each with its reason (SUBSTITUTES below, printed in the summary);
  - then the example lines of every subcommand's --help, as printed.
Exit code 0 only if every command exited 0 and every substitution still matches a README line.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = None
# README line -> (what runs instead, or SKIP; why)
SUBSTITUTES: dict[str, tuple[str | None, str]] = {
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/lmcx run configs/quickstart.yaml': (
        "lmcx run configs/quickstart.yaml", "no network for pip: the current environment stands in for .venv"),
    ".venv/bin/python -m pytest": (
        "python -m pytest --collect-only -q", "the whole suite takes many minutes on 2 cores: collected only"),
    ".venv/bin/python scripts/bench_match.py": (SKIP, "a benchmark (minutes), not an example to check"),
    ".venv/bin/python scripts/readme_examples.py": (SKIP, "this script"),
    "tensorboard --logdir runs": (
        "python -c \"from tensorboard.backend.event_processing.event_accumulator import EventAccumulator as E; "
        "e = E('runs/s4/tensorboard'); e.Reload(); assert e.Tags()['scalars']\"",
        "starts a server: the event files it would show are read back instead"),
    "lmcx train -c configs/mnist_mlp.yaml --set data.download=true": (
        SKIP, "downloads MNIST: no network here; the offline line below trains on the same files"),
    "lmcx train -c configs/cifar10_resnet20.yaml --set data.name=cifar10 --set data.download=true": (
        SKIP, "downloads CIFAR-10: no network here; the offline line below runs the config"),
    "lmcx train -c configs/mnist_mlp.yaml --data-root /tmp/lmcx-data": (
        "lmcx train -c configs/mnist_mlp.yaml --data-root /tmp/lmcx-data --epochs 1",
        "one epoch instead of 10 (full MNIST on 2 CPU cores)"),
    "lmcx train -c configs/cifar10_resnet20.yaml --data-root /tmp/lmcx-data": (
        "lmcx train -c configs/cifar10_resnet20.yaml --data-root /tmp/lmcx-data --epochs 1 --device cpu "
        "--set data.train_size=1000 --set train.batch_size=100 --out runs/cifar-smoke",
        "100 epochs of ResNet-20 need a GPU: one epoch on 1000 images (the whole dataset is still decoded)"),
    "torchrun --nproc_per_node 8 -m lmcx train -c configs/cifar10_resnet20.yaml --width 32 --seed 0": (
        "torchrun --nproc_per_node 2 -m lmcx train -c configs/digits_mlp.yaml --epochs 2 --device cpu "
        "--out runs/ddp", "8 GPUs: two CPU processes (gloo) on digits"),
    "lmcx run configs/paper-b/resnet20_cifar10.yaml --data-root /tmp/lmcx-data": (
        "lmcx run configs/paper-b/resnet20_cifar10.yaml --data-root /tmp/lmcx-data --dry-run",
        "about 12 GPU hours: the plan is built and listed"),
    "lmcx run configs/paper-a/mlp_mnist.yaml --data-root /tmp/lmcx-data": (
        "lmcx run configs/paper-a/mlp_mnist.yaml --data-root /tmp/lmcx-data --dry-run",
        "about 1 GPU hour: the plan is built and listed"),
}


def readme_examples(text: str) -> list[tuple[str, str]]:
    """("bash", command line without its trailing comment) for each command of a ```bash block, ("python",
    code) for each ```python block, in README order; comment-only lines and blank lines are left out."""
    examples = []
    for lang, body in re.findall(r"^```(bash|python)\n(.*?)^```", text, re.M | re.S):
        if lang == "python":
            examples.append(("python", body))
            continue
        for line in body.splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()  # without its trailing comment
            if command and not command.startswith("#"):
                examples.append(("bash", command))
    return examples


def help_examples(env: dict[str, str], cwd: Path) -> list[str]:
    """The `lmcx ...` lines of every subcommand's help, as the clone's CLI prints them."""
    code = ("import typer.main; from lmcx.cli import app; g = typer.main.get_command(app)\n"
            "for c in g.commands.values():\n"
            "    [print(l.strip()) for l in (c.help or '').splitlines() if l.strip().startswith('lmcx ')]")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def prepare(work: Path, shared: Path) -> tuple[Path, dict[str, str]]:
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    if not (work / "shared").exists():
        (work / "shared").symlink_to(shared.resolve())
    bin_dir = work / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, line in (("lmcx", "-m lmcx"), ("python", ""), ("python3", "")):  # a symlink loses the venv
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {line} "$@"\n')
        (bin_dir / name).chmod(0o755)
    python_bin = Path(sys.executable).parent  # torchrun, tensorboard
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{python_bin}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(clone), "MPLBACKEND": "Agg"}
    return clone, env


def run(kind: str, command: str, env: dict[str, str], cwd: Path) -> tuple[int, float, str]:
    argv = ["bash", "-euo", "pipefail", "-c", command] if kind == "bash" else [sys.executable, "-c", command]
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - started, (done.stdout + done.stderr).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lmcx-readme-"))
    work.mkdir(parents=True, exist_ok=True)
    clone, env = prepare(work, args.shared)
    examples = readme_examples((clone / "README.md").read_text())
    unused = set(SUBSTITUTES) - {command for _, command in examples}
    print(f"{len(examples)} README examples, in {clone}")
    results = []  # (where, status, seconds, command, note)
    for kind, command in examples:
        instead, why = SUBSTITUTES.get(command, (command, ""))
        if instead is SKIP:
            results.append(("README", "skipped", 0.0, command, why))
            print(f"  skipped  {command}  ({why})")
        else:
            results.append(_one("README", kind, command, instead, why, env, clone))
    lines = help_examples(env, clone)  # after the README's examples, which make the runs they use
    print(f"{len(lines)} help examples")
    results += [_one("help", "bash", line, line, "", env, clone) for line in lines]
    failed = [r for r in results if r[1] == "FAILED"]
    counts = {s: sum(r[1] == s for r in results) for s in ("ran", "substituted", "skipped", "FAILED")}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({sum(r[2] for r in results):.0f} s)")
    for where, status, _, command, note in results:
        if status in ("substituted", "skipped"):
            print(f"  {status}: {command}\n      {note}")
    if unused:
        print("substitutions for lines the README no longer has: " + "; ".join(sorted(unused)))
    return 1 if failed or unused else 0


def _one(where: str, kind: str, command: str, instead: str, why: str, env: dict[str, str], cwd: Path):
    code, seconds, output = run(kind, instead, env, cwd)
    status = "FAILED" if code else ("substituted" if instead != command else "ran")
    shown = command if kind == "bash" else f"python block ({len(command.splitlines())} lines)"
    print(f"  {status:<11} {seconds:6.1f} s  [{where}] {shown}")
    if code:
        print("      " + "\n      ".join(output.splitlines()[-15:]))
    note = why + (f"; ran: {instead}" if instead != command else "")
    return where, status, seconds, shown, note


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the command-line output shown in the documentation.

Writes, under ``docs/_generated/`` (committed; the user guide includes the
files with ``literalinclude``):

* ``demo.txt``: the real stdout of ``skmerge demo`` with default settings
  (also copied into README.md between its ``demo-output`` markers)
  (about a minute on 2 CPU cores; the accuracies are reproducible for a
  given torch version, the merge and wall times are not);
* ``cli_workflow.txt``: ``skmerge train``, ``merge`` and ``evaluate`` on
  digits in a temporary folder, commands and stdout (a few seconds);
* ``cli_help.txt``, ``cli_help_<command>.txt``: ``skmerge [COMMAND] --help``
  at 80 columns (a test checks that they are current).

Run from the repository root, with skmerge installed (``pip install -e .``)::

    python benchmarks/demo_output.py              # everything
    python benchmarks/demo_output.py --help-only  # only the help texts (fast)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ROOT / "docs" / "_generated"
COMMANDS = (None, "demo", "train", "merge", "evaluate")
WORKFLOW = (
    "skmerge train --model mlp --hidden 64,64,64 --dataset digits --n-models 2 --epochs 40 "
    "--out runs/",
    "skmerge merge runs/mlp_seed0.pt runs/mlp_seed1.pt --dataset digits --out merged.pt",
    "skmerge evaluate runs/mlp_seed0.pt runs/mlp_seed1.pt merged.pt --dataset digits",
)


def write_help() -> None:
    """Write ``skmerge [COMMAND] --help`` for every command."""
    from skmerge.cli import main

    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal width
    for command in COMMANDS:
        argv = ["--help"] if command is None else [command, "--help"]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            main(argv)
        name = "cli_help.txt" if command is None else f"cli_help_{command}.txt"
        (GENERATED / name).write_text(f"$ skmerge {' '.join(argv)}\n{buffer.getvalue()}")
        print(f"wrote docs/_generated/{name}", file=sys.stderr)


def write_demo() -> None:
    """Run ``skmerge demo`` in a fresh process and keep its stdout."""
    # `python -m skmerge.cli` is the `skmerge` script without relying on PATH.
    done = subprocess.run([sys.executable, "-m", "skmerge.cli", "demo"], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True, check=True)
    (GENERATED / "demo.txt").write_text("$ skmerge demo\n" + done.stdout)
    print("wrote docs/_generated/demo.txt", file=sys.stderr)
    write_readme_excerpt(done.stdout)


README_START, README_END = "<!-- demo-output:start -->", "<!-- demo-output:end -->"


def write_readme_excerpt(demo_stdout: str) -> None:
    """Put the demo's table between the README's markers (README numbers are never typed)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, found, rest = text.partition(README_START)
    _, found_end, tail = rest.partition(README_END)
    if not (found and found_end):
        raise SystemExit(f"README.md lacks the {README_START} ... {README_END} markers")
    block = f"{README_START}\n```text\n$ skmerge demo\n{demo_stdout.rstrip()}\n```\n{README_END}"
    readme.write_text(head + block + tail)
    print("wrote the demo output into README.md", file=sys.stderr)


def write_workflow() -> None:
    """Run the train -> merge -> evaluate commands in a scratch folder."""
    # One thread, as in the demo: these tiny models run fastest that way, and
    # the printed accuracies do not depend on it.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parts = []
    with tempfile.TemporaryDirectory() as scratch:
        for command in WORKFLOW:
            argv = shlex.split(command)
            done = subprocess.run([sys.executable, "-m", "skmerge.cli", *argv[1:]], cwd=scratch,
                                  env=env, stdout=subprocess.PIPE, text=True, check=True)
            parts.append(f"$ {command}\n{done.stdout}")
    (GENERATED / "cli_workflow.txt").write_text("\n".join(parts))
    print("wrote docs/_generated/cli_workflow.txt", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--help-only", action="store_true",
                        help="regenerate the --help texts only, not the demo output")
    args = parser.parse_args()
    GENERATED.mkdir(parents=True, exist_ok=True)
    write_help()
    if not args.help_only:
        write_workflow()
        write_demo()


if __name__ == "__main__":
    main()

"""`make bench`: run every benchmark, then write bench/results/latest.json and latest.md.

Each benchmark is a script that prints a markdown table and writes JSON to `--json PATH`.
They run one after another (never in parallel: this is a 2-core machine and every number is a
ratio measured side by side inside one script).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from headline import headline_markdown  # bench/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHES = ("speculative", "daemon", "learning", "workloads", "history")


def machine_description() -> dict[str, str | int]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "system": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
    }


def git_commit() -> str:
    """The commit the benchmarks ran at ("+dirty" when tracked files had changes)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    parts = [
        f"# SpecLoRA benchmark results\n\n{report['date']} on {m['cpu']} ({m['cores']} cores, "
        f"{m['system']})\n",
        f"## Headline\n\n{headline_markdown(report['benchmarks'])}\n",
    ]
    for name in BENCHES:
        if name in report["benchmarks"]:
            run = report["runs"][name]
            parts.append(
                f"## {name}\n\nRun {run['date']} at commit {run['commit']}.\n\n{run['markdown']}\n"
            )
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=BENCHES, action="append", help="run just these")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other benchmarks of the existing latest.json (with --only)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds (for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report: dict[str, Any] = {"date": now, "machine": machine_description(), "benchmarks": {}}
    report["runs"] = {}
    if args.merge and (args.out / "latest.json").exists():
        old = json.loads((args.out / "latest.json").read_text())
        report["benchmarks"].update(old["benchmarks"])
        report["runs"].update(old["runs"])
    commit = git_commit()
    failed = []
    for name in args.only or BENCHES:
        json_path = args.out / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(json_path)]
        if args.smoke:
            command.append("--smoke")
        print(f"\n## {name}\n$ {' '.join(command)}", flush=True)
        began = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        print(result.stdout, flush=True)
        if result.returncode != 0:
            failed.append(name)
            continue
        report["benchmarks"][name] = json.loads(json_path.read_text())
        report["runs"][name] = {
            "date": began,
            "commit": commit,
            "markdown": result.stdout.strip(),
        }
    (args.out / "latest.json").write_text(json.dumps(report, indent=2))
    (args.out / "latest.md").write_text(render(report))
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

from headline import headline_markdown  # bench/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHES = ("speculative", "daemon", "learning")


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=BENCHES, action="append", help="run just these")
    parser.add_argument("--smoke", action="store_true", help="tiny models, seconds (for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "benchmarks": {},
    }
    markdown = [
        f"# SpecLoRA benchmark results\n\n{report['date']} on "
        f"{report['machine']['cpu']} ({report['machine']['cores']} cores, "  # type: ignore[index]
        f"{report['machine']['system']})\n"
    ]  # type: ignore[index]
    failed = []
    for name in args.only or BENCHES:
        json_path = args.out / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(json_path)]
        if args.smoke:
            command.append("--smoke")
        print(f"\n## {name}\n$ {' '.join(command)}", flush=True)
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        print(result.stdout, flush=True)
        if result.returncode != 0:
            failed.append(name)
            continue
        report["benchmarks"][name] = json.loads(json_path.read_text())  # type: ignore[index]
        markdown.append(f"## {name}\n\n{result.stdout.strip()}\n")
    # The figures the issues set targets for, first: README's results table is this one.
    markdown.insert(1, f"## Headline\n\n{headline_markdown(report['benchmarks'])}\n")
    (args.out / "latest.json").write_text(json.dumps(report, indent=2))
    (args.out / "latest.md").write_text("\n".join(markdown))
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

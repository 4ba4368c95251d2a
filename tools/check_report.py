"""Check that an HTML report's figures render: headless Chromium runs its scripts, the DOM is read
back, and every figure container must hold a drawn Plotly plot; a screenshot is saved beside it.

    python tools/check_report.py runs/demo/report.html [--screenshot runs/demo/report.png]

Exit 0 when every figure rendered, 1 otherwise (with what is missing).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=20000"]


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: install one (apt-get install -y chromium; `make chromium` does it)")


def rendered_figures(html_file: Path) -> tuple[int, int]:
    """(figure containers in the file, containers holding a drawn plot after the scripts ran)."""
    dom = subprocess.run([browser(), *FLAGS, "--dump-dom", html_file.resolve().as_uri()], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    chunks = dom.split('class="figure"')[1:]  # each figure container up to the next one
    drawn = sum('class="main-svg"' in c and "js-plotly-plot" in c for c in chunks)
    return len(chunks), drawn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path)
    ap.add_argument("--screenshot", type=Path, help="PNG to write (default: the report's name with .png)")
    args = ap.parse_args()
    if not args.report.exists():
        print(f"{args.report} does not exist", file=sys.stderr)
        return 1
    shot = args.screenshot or args.report.with_suffix(".png")
    subprocess.run([browser(), *FLAGS, "--window-size=1200,4000", f"--screenshot={shot.resolve()}",
                    args.report.resolve().as_uri()], capture_output=True, timeout=300, check=True)
    containers, drawn = rendered_figures(args.report)
    print(f"{args.report}: {drawn} of {containers} figures rendered; screenshot {shot}")
    if containers == 0 or drawn != containers or not shot.exists() or shot.stat().st_size == 0:
        print("report check FAILED: some figures did not render", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

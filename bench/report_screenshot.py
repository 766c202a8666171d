"""Render a compressor report.html in headless Chromium and save a PNG screenshot.

    python bench/report_screenshot.py run/report.html --out report.png

Checks that the page renders with its embedded figures (the PNG is written and non-blank).
Needs Chromium (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--window-size=1000,1800",
                        f"--screenshot={args.out.resolve()}", args.report.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    from PIL import Image  # matplotlib depends on pillow

    image = Image.open(args.out).convert("L")
    lo, hi = image.getextrema()
    print(f"{args.out}: {image.size[0]}x{image.size[1]} px, grey range {lo}-{hi}")
    return 0 if hi - lo > 50 else 1


if __name__ == "__main__":
    sys.exit(main())

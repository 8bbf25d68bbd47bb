"""Pin the uv that the docker's installer downloads: PyPI's wheel per platform, with its URL and
SHA-256, written to ``packaging/uv.json`` (the release zip carries it as ``backend/uv.json``).

    python packaging/uv_pin.py 0.13.9

pip resolves each platform's wheel without installing it (``pip install --dry-run --report``);
the hashes are PyPI's own. Run it when moving to another uv, and commit the file.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "uv.json"
# installer.platform_key() -> a pip platform tag that PyPI's uv wheels carry
PLATFORMS = {
    "linux-x86_64": "manylinux_2_17_x86_64",
    "linux-aarch64": "manylinux_2_17_aarch64",
    "macos-x86_64": "macosx_10_12_x86_64",
    "macos-arm64": "macosx_11_0_arm64",
    "windows-x86_64": "win_amd64",
}


def resolve(version: str, tag: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                        "--no-deps", "--only-binary=:all:", "--platform", tag, "--python-version", "3.12",
                        "--target", str(Path(tmp) / "t"), f"uv=={version}"], check=True)
        [item] = json.loads(report.read_text())["install"]
    info = item["download_info"]
    return {"url": info["url"], "sha256": info["archive_info"]["hashes"]["sha256"]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    version = argv[0]
    pins = {"version": version, "wheels": {key: resolve(version, tag) for key, tag in PLATFORMS.items()}}
    OUT.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

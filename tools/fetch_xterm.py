"""Fetch xterm.js for the web terminal from the npm registry, at build time.

The page the daemon serves at ``/`` loads xterm.js from the daemon itself, never
from a CDN: ``./dev`` (and ``setup.py`` when the files are missing) runs this to
put the pinned versions into ``vhubd/api/static/vendor/``, which ships as package
data (and in the sdist, so a wheel builds offline from it). Each tarball is
checked against the sha512 ``integrity`` the registry publishes for that version
(pinned here). Stdlib only; imports nothing from the package.

    python tools/fetch_xterm.py [--check]
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
VENDOR = os.path.join(os.path.dirname(HERE), "vhubd", "api", "static", "vendor")
REGISTRY = os.environ.get("BLINK_NPM_REGISTRY", "https://registry.npmjs.org")

# package, version, dist.integrity (npm view PACKAGE@VERSION dist.integrity), {file in tarball: name here}
PACKAGES = (
    ("@xterm/xterm", "5.5.0",
     "sha512-hqJHYaQb5OptNunnyAnkHyM8aCjZ1MEIDTQu1iIbbTD/xops91NB5yq1ZK/dC2JDbVWtF23zUtl9JE2NqwT87A==",
     {"package/lib/xterm.js": "xterm.js", "package/css/xterm.css": "xterm.css",
      "package/LICENSE": "xterm.LICENSE"}),
    ("@xterm/addon-fit", "0.10.0",
     "sha512-UFYkDm4HUahf2lnEyHvio51TNGiLK66mqP2JoATy7hRZeXaGMRDr00JiSF7m63vR5WKATF605yEggJKsw0JpMQ==",
     {"package/lib/addon-fit.js": "addon-fit.js", "package/LICENSE": "addon-fit.LICENSE"}),
)
STAMP = os.path.join(VENDOR, "VERSIONS")


def _stamp_text() -> str:
    return "".join(f"{name}@{version} {integrity}\n" for name, version, integrity, _ in PACKAGES)


def up_to_date() -> bool:
    try:
        with open(STAMP) as f:
            if f.read() != _stamp_text():
                return False
    except OSError:
        return False
    return all(os.path.exists(os.path.join(VENDOR, out)) for *_, files in PACKAGES for out in files.values())


def fetch(name: str, version: str, integrity: str) -> bytes:
    url = f"{REGISTRY}/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as resp:
        data = resp.read()
    algo, _, want = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        raise SystemExit(f"fetch_xterm: {url}: {algo} integrity mismatch (got {got}, the registry says {want})")
    return data


def main(argv: list[str]) -> int:
    if up_to_date():
        return 0
    if "--check" in argv:
        sys.stderr.write(f"fetch_xterm: {VENDOR} is missing or out of date\n")
        return 1
    os.makedirs(VENDOR, exist_ok=True)
    for name, version, integrity, files in PACKAGES:
        data = fetch(name, version, integrity)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member, out in files.items():
                f = tar.extractfile(member)
                if f is None:
                    raise SystemExit(f"fetch_xterm: {name}@{version} has no {member}")
                with open(os.path.join(VENDOR, out), "wb") as dst:
                    dst.write(f.read())
        sys.stderr.write(f"fetch_xterm: {name}@{version} -> {VENDOR}\n")
    with open(STAMP, "w") as f:
        f.write(_stamp_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

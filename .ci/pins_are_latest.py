"""Report, for each package pip-audit could not audit, whether its pin is the latest release.

Reads pip-audit's "could not be audited: NAME (VERSION)" lines and asks pip itself (`pip index
versions`, which uses pip's own index configuration) for each package's latest release. It cannot
see advisories. A newer release is reported for whoever keeps the pins, never a failure: a release
upstream must not stop an unrelated change from landing (a known advisory still fails pip-audit).
"""

import re
import subprocess
import sys

for line in sys.stdin:
    name, version = re.search(r"audited: (\S+) \((\S+)\)", line).groups()
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                             capture_output=True, text=True, timeout=120).stdout
    found = re.search(rf"^{re.escape(name)} \((\S+)\)", listing, re.MULTILINE | re.IGNORECASE)
    latest = found.group(1) if found else "unknown"
    print(f"{name} {version}: " + ("the latest release" if latest == version else f"a newer release is out ({latest})"))

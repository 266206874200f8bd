"""Report, for each package pip-audit could not audit, whether its pin is the latest release.

Reads pip-audit's "could not be audited: NAME (VERSION)" lines and asks pip itself (`pip index
versions`, which uses pip's own index configuration) for each package's latest release. It cannot
see advisories: a pin that is the latest release has no fix to move to, which is all this checks.
Exits 1 if one of requirements.txt's own pins is not the latest release (a dependency of a
dependency that is not is only reported: its pin is not ours to move).
"""

import re
import subprocess
import sys

direct = {re.split(r"[\[=]", line)[0].strip().lower() for line in open("requirements.txt") if line.strip()}
stale = 0
for line in sys.stdin:
    name, version = re.search(r"audited: (\S+) \((\S+)\)", line).groups()
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                             capture_output=True, text=True, timeout=120).stdout
    found = re.search(rf"^{re.escape(name)} \((\S+)\)", listing, re.MULTILINE | re.IGNORECASE)
    latest = found.group(1) if found else "unknown"
    if latest != version:
        stale += name.lower() in direct
        print(f"{name} {version}: not the latest release ({latest})")
    else:
        print(f"{name} {version}: the latest release")
sys.exit(1 if stale else 0)

"""Check packages pip-audit could not audit against PyPI's project pages.

Reads pip-audit's "could not be audited: NAME (VERSION)" lines. A project page lists the known
vulnerabilities of the latest release only, so a pin that is not the latest is reported unaudited.
Exits 1 if a pinned release has known vulnerabilities.
"""

import json
import re
import sys
import urllib.request

failed = 0
for line in sys.stdin:
    name, version = re.search(r"audited: (\S+) \((\S+)\)", line).groups()
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as page:
        project = json.load(page)
    latest = project["info"]["version"]
    if version != latest:
        print(f"{name} {version}: not the latest release ({latest}), so not audited")
    elif project["vulnerabilities"]:
        failed += 1
        ids = [vulnerability.get("id") for vulnerability in project["vulnerabilities"]]
        print(f"{name} {version}: known vulnerabilities {ids}")
    else:
        print(f"{name} {version}: latest release, no known vulnerabilities")
sys.exit(1 if failed else 0)

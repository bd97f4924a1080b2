#!/usr/bin/env python3
"""Renders the chart with Helm's own engine (as check_deploy.py does) and prints the
objects of one kind as a JSON array, for tests that need what the chart renders:

    python3 tests/deploy/render_chart.py PrometheusRule '{"rules": {"prometheus": {"enabled": true}}}'

Exits 1 with Helm's message when the chart refuses the values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "keel-scraper"


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    kind = sys.argv[1]
    values = json.loads(sys.argv[2]) if len(sys.argv) == 3 else {}
    with helm.Chart.load(str(CHART)) as chart:
        try:
            manifests = chart.render(
                values=values, name="keel-scraper", namespace="tkeel-system", is_install=True
            )
        except helm.HelmError as err:
            print(f"the chart refused the values: {err}", file=sys.stderr)
            return 1
    found = [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc and doc.get("kind") == kind
    ]
    json.dump(found, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

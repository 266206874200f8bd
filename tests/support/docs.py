"""The SQL that docs/database.md shows, read from the page itself so the tests run what readers copy."""

import re

from .server import ROOT


def documented_queries(block: int, until: str = "now()") -> list[str]:
    """Return the queries of a ```sql block of docs/database.md (0: the events table's, 1: the readings'),
    their fixed day moved to the day before `until`."""
    examples = re.findall(r"```sql\n(.*?)```", (ROOT / "docs" / "database.md").read_text(), re.DOTALL)[block]
    examples = examples.replace("'2026-11-20'", "now() - interval '1 day'").replace("'2026-11-21'", until)
    return [query for query in examples.split(";") if query.strip()]


def chart_queries() -> list[str]:
    """Return the queries docs/database.md gives for charts: its indented ``` blocks that name no language."""
    blocks = re.findall(r"\n  ```\n(.*?)\n  ```", (ROOT / "docs" / "database.md").read_text(), re.DOTALL)
    return [block.replace("\n  ", "\n").strip().rstrip(";") for block in blocks]


def plan_nodes(plan: dict):
    """Yield every node of an EXPLAIN plan, top first."""
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def index_roots(connection) -> dict[str, str]:
    """Return, for each index of a partition, the partitioned table's index it is part of (its own name for others):
    a plan names the partition's index, a test the table's."""
    found = connection.execute("""
        SELECT c.relname, (SELECT r.relid::regclass::text FROM pg_partition_ancestors(c.oid) AS r
                           ORDER BY (SELECT count(*) FROM pg_partition_ancestors(r.relid)) LIMIT 1)
        FROM pg_class AS c WHERE c.relkind IN ('i', 'I') AND c.relnamespace = current_schema()::regnamespace
    """).fetchall()
    return {name: root for name, root in found}

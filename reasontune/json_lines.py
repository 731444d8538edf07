"""The one parser of JSON-lines files (and of a .json array of records), and the error it raises.

Kept apart from ``data`` (which imports the graders) so that the run-directory readers and
the trackers read JSON lines without loading anything else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """A malformed data file or record; the message names file, line and field."""


_LINE_END = re.compile(r"\r\n|\r|\n")


def read_json_records(path: Path, errors: str = "strict") -> Iterator[tuple[int, Any, str | None]]:
    """Yields (line, record or None, error) for a JSONL file, or for a .json holding one array: the one parser of JSON lines.

    Text that is not UTF-8 raises ``DataError`` naming the line, unless ``errors="replace"``
    (a reader that shows what it can: its bad bytes become U+FFFD).
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}); "
                        "save the file as UTF-8") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:1: invalid JSON: nested too deeply") from None
        except ValueError as error:  # a number past int()'s digit limit
            raise DataError(f"{path}:1: invalid JSON: {' '.join(str(error).split(';')[0].split())}") from None
        if not isinstance(array, list):
            raise DataError(f"{path}:1: expected a JSON array of records or JSON lines")
        for index, record in enumerate(array, start=1):
            yield index, record, None
        return
    # Lines end at \n, \r\n or \r only: str.splitlines would also cut at U+2028, U+0085 and the like, which JSON
    # keeps unescaped inside strings (a model's response may hold them), breaking a valid record in two.
    for number, raw_line in enumerate(_LINE_END.split(text), start=1):
        if not raw_line.strip():
            continue
        try:
            record = json.loads(raw_line)
        except json.JSONDecodeError as error:
            yield number, None, f"invalid JSON: {error.msg} at column {error.colno}"
        except RecursionError:
            yield number, None, "invalid JSON: nested too deeply"
        except ValueError as error:  # a number past int()'s digit limit
            yield number, None, f"invalid JSON: {str(error).split(';')[0]}"
        else:
            yield number, record, None

"""The file source: a JSON file shaped like a view body, or JSON Lines.

``format = "json"``: the whole file is one body and one page; ``records`` is
the dotted path to the list ("" when the file is the list). It is read at
once, so a file over ``max_page_bytes`` is refused before it is read: use
JSON Lines for big files.

``format = "jsonl"``: one record per line, streamed in pages of at most
``page_size`` records (``max_records_per_page`` if lower) and
``max_page_bytes`` bytes; blank lines are skipped and ``records`` is not
used. A single line over ``max_page_bytes`` fails the poll at that line.

Without ``format`` a ``.jsonl`` suffix means JSON Lines, anything else JSON.
A relative ``path`` resolves against the folder of the config file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from sources.base import Page, PageError, SourceConfig, counted, dig, parse_json


class FileSource:
    """Reads records from a local JSON or JSON Lines file."""

    class Config(SourceConfig):
        kind: Literal["file"]
        path: Path
        format: Literal["json", "jsonl"] | None = None
        page_size: int = Field(1000, ge=1)

    def __init__(self, config: FileSource.Config, *, base_dir: Path):
        self.config = config
        self.path = Path(base_dir) / config.path.expanduser()

    def pages(self, params: dict[str, str]) -> Iterator[Page]:
        """Yield the file's records page by page; `params` do not apply to files."""
        jsonl = (self.config.format or ("jsonl" if self.path.suffix.lower() == ".jsonl" else "json")) == "jsonl"
        try:
            yield from self._lines() if jsonl else self._body()
        except FileNotFoundError:
            raise PageError(f"{self.path}: file not found (path = '{self.config.path}' in the config, relative to the config file's folder)", page=1) from None
        except OSError as exc:
            raise PageError(f"{self.path}: cannot read the file ({exc.strerror or type(exc).__name__})", page=1) from None

    def _body(self) -> Iterator[Page]:
        """The whole file as one view body: one page."""
        body = parse_json(self._whole(), f"{self.path}:", 1)
        path = self.config.records
        try:
            records = dig(body, path)
        except KeyError:
            hint = "; set records = \"\" when the file is the list itself" if isinstance(body, list) else ""
            raise PageError(f"{self.path}: no records at '{path}'{hint}", page=1) from None
        if not isinstance(records, list):
            raise PageError(f"{self.path}: '{path or '(the file)'}' is a {type(records).__name__}, not a list of records", page=1)
        yield Page(1, counted(records, self.config.max_records_per_page, str(self.path), 1), str(self.path))

    def _whole(self) -> bytes:
        """The file's bytes, refused unread when over `max_page_bytes` (and read no further than that, should it grow)."""
        cap = self.config.max_page_bytes
        with self.path.open("rb") as file:
            raw = file.read(cap + 1) if os.fstat(file.fileno()).st_size <= cap else None
        if raw is None or len(raw) > cap:
            raise PageError(f"{self.path}: the file is over max_page_bytes = {cap:,} bytes; raise max_page_bytes, "
                            "or write JSON Lines (format = \"jsonl\"), which is read a page at a time", page=1)
        return raw

    def _lines(self) -> Iterator[Page]:
        """One record per line; a page ends at `page_size` records or `max_page_bytes` bytes."""
        size, cap = min(self.config.page_size, self.config.max_records_per_page), self.config.max_page_bytes
        number, records, first, last, used = 1, [], 1, 0, 0
        with self.path.open("rb") as lines:
            for line_number, line in enumerate(iter(lambda: lines.readline(cap + 1), b""), start=1):
                if len(line) > cap and not line.endswith(b"\n"):  # read no further: the line alone is over the cap
                    raise PageError(f"{self.path} line {line_number}: the line is over max_page_bytes = {cap:,} bytes; raise max_page_bytes", page=number)
                if not line.strip():
                    continue
                if records and (len(records) == size or used + len(line) > cap):
                    yield Page(number, records, f"{self.path} lines {first}-{last}")
                    number, records, first, used = number + 1, [], last + 1, 0
                records.append(parse_json(line, f"{self.path} line {line_number}:", number))
                last, used = line_number, used + len(line)
        if records or number == 1:
            yield Page(number, records, f"{self.path} lines {first}-{max(first, last)}")

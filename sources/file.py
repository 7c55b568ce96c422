"""The file source: a JSON file shaped like a view body, or JSON Lines.

``format = "json"``: the whole file is one body and one page; ``records`` is
the dotted path to the list ("" when the file is the list). It is read at
once, so use JSON Lines for big files.

``format = "jsonl"``: one record per line, streamed in pages of
``page_size``; blank lines are skipped and ``records`` is not used.

Without ``format`` a ``.jsonl`` suffix means JSON Lines, anything else JSON.
A relative ``path`` resolves against the folder of the config file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from sources.base import Page, PageError, SourceConfig, dig, parse_json


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
        body = parse_json(self.path.read_bytes(), f"{self.path}:", 1)
        path = self.config.records
        try:
            records = dig(body, path)
        except KeyError:
            hint = "; set records = \"\" when the file is the list itself" if isinstance(body, list) else ""
            raise PageError(f"{self.path}: no records at '{path}'{hint}", page=1) from None
        if not isinstance(records, list):
            raise PageError(f"{self.path}: '{path or '(the file)'}' is a {type(records).__name__}, not a list of records", page=1)
        yield Page(1, records, str(self.path))

    def _lines(self) -> Iterator[Page]:
        """One record per line, `page_size` records a page."""
        number, records, first, line_number = 1, [], 1, 0
        with self.path.open("rb") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                records.append(parse_json(line, f"{self.path} line {line_number}:", number))
                if len(records) == self.config.page_size:
                    yield Page(number, records, f"{self.path} lines {first}-{line_number}")
                    number, records, first = number + 1, [], line_number + 1
        if records or number == 1:
            yield Page(number, records, f"{self.path} lines {first}-{max(first, line_number)}")

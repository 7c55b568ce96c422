"""FileSource: JSON bodies, JSON Lines pages, and files that are missing or broken."""
import json
from pathlib import Path

import pydantic
import pytest

from sources.base import PageError
from sources.file import FileSource
from viewserver import make_leads


def make_source(base_dir: Path, path: str, **config) -> FileSource:
    """A FileSource for `path` (relative to `base_dir`, like a config file's folder)."""
    return FileSource(FileSource.Config.model_validate({"kind": "file", "path": path, **config}), base_dir=base_dir)


def write_jsonl(path: Path, records: list) -> None:
    """One JSON record per line."""
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")


def test_json_view_body_is_one_page(tmp_path):
    leads = make_leads(3)
    (tmp_path / "leads.json").write_text(json.dumps({"records": leads, "total": 3}, ensure_ascii=False), encoding="utf-8")
    (page,) = make_source(tmp_path, "leads.json").pages({})
    assert (page.number, page.records) == (1, leads)
    assert page.where == str(tmp_path / "leads.json")


def test_json_list_with_empty_records_path_and_nested_path(tmp_path):
    (tmp_path / "list.json").write_text('[{"id": 1}, {"id": "a\\ud800"}]')
    (tmp_path / "nested.json").write_text('{"data": {"items": [{"id": 2}]}}')
    assert next(make_source(tmp_path, "list.json", records="").pages({})).records == [{"id": 1}, {"id": "a\ud800"}]
    assert next(make_source(tmp_path, "nested.json", records="data.items").pages({})).records == [{"id": 2}]


def test_relative_path_resolves_against_the_config_folder(tmp_path):
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "leads.json").write_text('{"records": [{"id": 1}]}')
    assert next(make_source(tmp_path, "examples/leads.json").pages({})).records == [{"id": 1}]


def test_jsonl_streams_in_pages_of_page_size(tmp_path):
    leads = make_leads(2500)
    write_jsonl(tmp_path / "leads.jsonl", leads)
    pages = list(make_source(tmp_path, "leads.jsonl").pages({}))
    assert [len(page.records) for page in pages] == [1000, 1000, 500]
    assert [record for page in pages for record in page.records] == leads
    assert [page.where.rsplit(" ", 1)[1] for page in pages] == ["1-1000", "1001-2000", "2001-2500"]


def test_format_key_overrides_the_suffix_and_blank_lines_are_skipped(tmp_path):
    (tmp_path / "export.txt").write_text('{"id": 1}\n\n{"id": 2}\n   \n{"id": 3}\n')
    pages = list(make_source(tmp_path, "export.txt", format="jsonl", page_size=2).pages({}))
    assert [page.records for page in pages] == [[{"id": 1}, {"id": 2}], [{"id": 3}]]


def test_an_empty_jsonl_file_is_one_empty_page(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert [page.records for page in make_source(tmp_path, "empty.jsonl").pages({})] == [[]]


def test_a_bad_jsonl_line_fails_its_page_after_earlier_pages_were_yielded(tmp_path):
    path = tmp_path / "leads.jsonl"
    write_jsonl(path, make_leads(5))
    with path.open("a") as file:
        file.write('{"id": 6}\n{"id": \n')
    pages = make_source(tmp_path, "leads.jsonl", page_size=5).pages({})
    assert len(next(pages).records) == 5
    with pytest.raises(PageError) as caught:
        next(pages)
    assert caught.value.page == 2
    assert str(caught.value).startswith(f"{path} line 7: not JSON (Expecting value")


def test_a_jsonl_line_that_is_not_utf8_names_its_line(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"id": 1}\n{"id": "caf\xe9"}\n')
    with pytest.raises(PageError, match=r"bad.jsonl line 2: not UTF-8 \(byte 0xe9"):
        list(make_source(tmp_path, "bad.jsonl").pages({}))


@pytest.mark.parametrize("name, content, records, message", [
    ("broken.json", b'{"records": [', "records", r"broken.json: not JSON \(Expecting value; line 1 column 14\)"),
    ("latin1.json", b'{"records": ["\xe9"]}', "records", r"latin1.json: not UTF-8"),
    ("items.json", b'{"items": []}', "records", r"items.json: no records at 'records'$"),
    ("list.json", b"[]", "records", r"list.json: no records at 'records'; set records = \"\""),
    ("dict.json", b'{"records": {"id": 1}}', "records", r"dict.json: 'records' is a dict, not a list"),
])
def test_broken_json_files_fail_clearly(tmp_path, name, content, records, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PageError, match=message) as caught:
        list(make_source(tmp_path, name, records=records).pages({}))
    assert caught.value.page == 1


def test_a_missing_file_says_where_it_was_looked_for(tmp_path):
    with pytest.raises(PageError) as caught:
        list(make_source(tmp_path, "nope/leads.json").pages({}))
    assert str(caught.value) == f"{tmp_path / 'nope/leads.json'}: file not found (path = 'nope/leads.json' in the config, relative to the config file's folder)"


def test_a_directory_is_not_readable_as_a_file(tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(PageError, match="folder.json: cannot read the file"):
        list(make_source(tmp_path, "folder.json").pages({}))


@pytest.mark.parametrize("config", [{"params": {"since": "x"}}, {"format": "csv"}, {"page_size": 0}, {"url": "http://x"}])
def test_config_rejects_keys_and_values_that_do_not_apply(config):
    with pytest.raises(pydantic.ValidationError):
        FileSource.Config.model_validate({"kind": "file", "path": "leads.json", **config})

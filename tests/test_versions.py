"""agent.versions: masked config text, content hashes, what changed between versions."""
import textwrap

from agent.config import load
from agent.versions import LEFT_OUT, changes, describe, mask_text, of

CONFIG = textwrap.dedent('''
    # the CRM sync
    [sources.leads]
    kind = "file"
    path = "leads.json"
    id = "lastSubmissionID"

    [connectors.crm]
    kind = "http"
    base_url = "https://crm.example.invalid/api"
    auth = { kind = "bearer", token = "tok-LITERAL-123" }
    [connectors.crm.objects.leads]
    path = "/leads"

    [connectors.view]
    kind = "http"
    base_url = "https://other.example.invalid"
    auth = { kind = "basic", username = "u", password = "${VIEW_PASSWORD}" }
    [connectors.view.objects.things]
    path = "/things"

    [[flows]]
    name = "f"
    source = "leads"
      [[flows.steps]]
      kind = "action"
      id = "to-crm"
      action = "crm > leads > create"
''')


def write(tmp_path, text):
    (tmp_path / "agent.toml").write_text(text)
    return load(tmp_path / "agent.toml")


def test_a_literal_secret_is_masked_and_a_reference_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("VIEW_PASSWORD", "pw-FROM-ENV-456")
    version = of(write(tmp_path, CONFIG))
    assert "tok-LITERAL-123" not in version.text and 'token = "***"' in version.text
    assert "${VIEW_PASSWORD}" in version.text and "pw-FROM-ENV-456" not in version.text
    assert "# the CRM sync" in version.text  # the file as written
    assert version.flows["f"]["steps"][0]["id"] == "to-crm"


def test_comments_and_layout_do_not_make_a_new_version_but_content_does(tmp_path, monkeypatch):
    monkeypatch.setenv("VIEW_PASSWORD", "x-1234")
    first = of(write(tmp_path, CONFIG))
    assert of(write(tmp_path, "# another comment\n" + CONFIG.replace(" = ", "   =   "))).hash == first.hash
    monkeypatch.setenv("VIEW_PASSWORD", "y-5678")  # credentials are fixed in place: not a new version
    assert of(write(tmp_path, CONFIG)).hash == first.hash
    edited = of(write(tmp_path, CONFIG.replace("crm > leads > create", "crm > leads > send")))
    assert edited.hash != first.hash
    assert changes(first.sections, edited.sections) == {"flows": {"added": [], "removed": [], "edited": ["f"]}}
    assert describe(changes(first.sections, edited.sections)) == "flows: ~f"


def test_a_secret_that_cannot_be_masked_in_place_leaves_its_line_out():
    text = 'a = "x"\nurl = "https://u:sec-RET-99@host.example"\nb = 1\n'
    masked = mask_text(text, ["sec-RET-99"])
    assert "sec-RET-99" not in masked and LEFT_OUT in masked and 'b = 1' in masked
    quoted = mask_text('token = "q\\"uote-1234"\n', ['q"uote-1234'])
    assert 'q\\"uote' not in quoted and 'token = "***"' in quoted


def test_changes_name_added_removed_and_edited_tables():
    before = {"sources": {"a": "1", "b": "2"}, "flows": {"f": "1"}}
    after = {"sources": {"a": "1", "c": "3"}, "flows": {"f": "2"}}
    assert changes(before, after) == {"sources": {"added": ["c"], "removed": ["b"], "edited": []},
                                      "flows": {"added": [], "removed": [], "edited": ["f"]}}
    assert describe(changes(before, after)) == "sources: +c -b; flows: ~f"

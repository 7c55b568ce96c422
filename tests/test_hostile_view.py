"""A view that answers hostile values, through the real CLI in-process: the poll fails cleanly, what it admitted is delivered."""
import json

import pytest

from viewserver import ViewServer, make_leads

HOSTILE_PORT = "http://127.0.0.1:99999/next?token=SECRET"

# paging config, the view's paging kind, and what the second page says instead of the truth
CASES = {
    "next URL with an impossible port": ('{ kind = "next_url", next = "next" }', "next_url", {"next": HOSTILE_PORT}, {}),
    "next URL an invalid IPv6 URL": ('{ kind = "next_url", next = "next" }', "next_url", {"next": "http://[::1/next?token=SECRET"}, {}),
    "Link header with an impossible port": ('{ kind = "link" }', "link", {}, {"Link": f'<{HOSTILE_PORT}>; rel="next"'}),
    "total a superscript two": ('{ kind = "page", size = 3, total = "total" }', "page", {"total": "²"}, {}),
    "total of 5,000 digits": ('{ kind = "page", size = 3, total = "total" }', "page", {"total": "9" * 5000}, {}),
}


def write_config(tmp_path, view: ViewServer, paging: str):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
ledger = "var/agent.db"

[sources.leads]
kind = "rest"
url = "{view.url}"
id = "lastSubmissionID"
updated = "lastModified"
first_run = "deliver"
timeout = "5s"
paging = {paging}

[connectors.out]
kind = "file"
path = "var/out.jsonl"

[[flows]]
name = "leads-to-file"
source = "leads"
  [[flows.steps]]
  kind = "action"
  action = "out > record > write"
""")
    return cfg


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_value_on_page_two_fails_the_poll_and_what_was_admitted_is_delivered(tmp_path, cli, case):
    paging, kind, hostile, headers = CASES[case]
    leads = make_leads(5)
    newest_first = list(reversed(leads))

    def second_page_lies(handler):
        """Page 2 carries its two records, and a hostile paging value."""
        if "page=2" not in handler.path:
            return handler.serve()
        body = {"records": newest_first[3:], "total": 5, "next": None, **hostile}
        handler.reply(200, json.dumps(body).encode(), headers)

    with ViewServer(leads, paging=kind, page_size=3) as view:
        view.fail_with(second_page_lies)
        cfg = write_config(tmp_path, view, paging)
        status, out, err = cli("--config", str(cfg), "run", "--once")
        assert len(view.hits) == 2  # the hostile value was never requested

    assert status == 1, out + err
    assert "failed polls: 1" in out and "new: 5" in out and "sent: 5" in out
    assert f"poll leads failed: page 2 of GET {view.url}: " in out
    assert "Traceback" not in out + err and "SECRET" not in out + err
    written = [json.loads(line) for line in (tmp_path / "var" / "out.jsonl").read_text().splitlines()]
    assert sorted(w["body"]["lastSubmissionID"] for w in written) == sorted(r["lastSubmissionID"] for r in leads)

    status, out, _ = cli("--config", str(cfg), "status", "--json")
    source = json.loads(out)["sources"]["leads"]
    assert source["failing"] and source["last_error"].startswith("page 2 of GET")
    assert source["cursor"] is None  # a failed poll does not move the cursor: the next poll reads the overlap again

"""agent/templates.py: sandboxed, strict Jinja for filters, maps and action inputs."""
from __future__ import annotations

import pytest

from agent.config import ActionStep, FilterStep, MapStep
from agent.templates import RenderError, Templates, TemplateSyntaxProblem


@pytest.fixture
def templates():
    return Templates()


@pytest.fixture
def context():
    """What the flow runner passes: a record plus the other names templates may use."""
    record = {
        "RecordId": 17,
        "Amount": 42,
        "Ratio": 0.5,
        "Active": False,
        "Note": None,
        "FirstName": "Zoë",
        "LastName": "Müller",
        "Email": "Zoe.Mueller@Example.INVALID",
        "Tags": ["a", "b"],
        "Address": {"City": "Köln", "Zip": "50667"},
        "Comment": "{{ 7*7 }} {% if true %}x{% endif %}",
        "Html": "<script>alert(1)</script>",
    }
    return {"record": record, "mapped": {"email": "zoe@example.invalid"}, "steps": {}, "source": "leads",
            "flow": "new-leads", "cursor": "2024-01-01T00:00:00Z", "now": "2024-01-02T00:00:00Z"}


# --- native types -------------------------------------------------------------


@pytest.mark.parametrize("template, expected", [
    ("{{ record.Amount }}", 42),
    ("{{ record.Ratio }}", 0.5),
    ("{{ record.Active }}", False),
    ("{{ record.Note }}", None),
    ("{{ record.Tags }}", ["a", "b"]),
    ("{{ record.Address }}", {"City": "Köln", "Zip": "50667"}),
    ("{{ record.Amount * 2 }}", 84),
    ("{{ record.Email | lower }}", "zoe.mueller@example.invalid"),
    ("{{ record.Address.Zip }}", "50667"),  # a string field stays a string, not a number
], ids=["int", "float", "bool", "none", "list", "dict", "arithmetic", "filter", "numeric-string"])
def test_a_single_expression_keeps_its_native_type(templates, context, template, expected):
    value = templates.render(template, context)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("template, expected", [
    ("{{ record.Amount }} EUR", "42 EUR"),
    ("{{ record.Amount }}{{ record.Amount }}", "4242"),
    ("{{ record.FirstName }} {{ record.LastName }}", "Zoë Müller"),
    ("{% if record.Amount > 40 %}big{% else %}small{% endif %}", "big"),
    ("Total: {{ record.Tags | length }}", "Total: 2"),
], ids=["suffix", "two-expressions", "two-names", "statement", "prefix"])
def test_anything_else_renders_to_a_string(templates, context, template, expected):
    assert templates.render(template, context) == expected


@pytest.mark.parametrize("value", ["no template here", "", 7, 1.5, True, None])
def test_a_value_without_template_syntax_is_returned_as_is(templates, context, value):
    assert templates.render(value, context) is value


def test_tables_and_lists_of_templates_render_recursively(templates, context):
    table = {
        "email": "{{ record.Email | lower }}",
        "amount": "{{ record.Amount }}",
        "name": ["{{ record.FirstName }}", {"last": "Mr/Ms {{ record.LastName }}", "id": "{{ record.RecordId }}"}],
        "fixed": 3,
        "nothing": None,
        "plain": "text",
    }
    assert templates.render(table, context) == {
        "email": "zoe.mueller@example.invalid",
        "amount": 42,
        "name": ["Zoë", {"last": "Mr/Ms Müller", "id": 17}],
        "fixed": 3,
        "nothing": None,
        "plain": "text",
    }
    assert table["amount"] == "{{ record.Amount }}"  # the config's table is not changed


def test_every_documented_name_is_available(templates, context):
    rendered = templates.render("{{ source }}/{{ flow }}/{{ cursor }}/{{ now }}/{{ mapped.email }}/{{ steps | length }}", context)
    assert rendered == "leads/new-leads/2024-01-01T00:00:00Z/2024-01-02T00:00:00Z/zoe@example.invalid/0"


# --- strict undefined -----------------------------------------------------------


@pytest.mark.parametrize("template, message", [
    ("{{ record.Missing }}", "missing field: 'dict object' has no attribute 'Missing'"
                             " (if it may be absent, give it a default: record.Missing | default(''))"),
    ("Hello {{ record.Missing }}!", "missing field: 'dict object' has no attribute 'Missing'"
                                    " (if it may be absent, give it a default: record.Missing | default(''))"),
    ("{{ record.Address.Street }}", "missing field: 'dict object' has no attribute 'Street'"
                                    " (if it may be absent, give it a default: record.Address.Street | default(''))"),
    ("{{ record.Missing.Deeper }}", "missing field: 'dict object' has no attribute 'Missing'"
                                    " (if it may be absent, give it a default: record.Missing | default(''))"),
    ("{{ record['First Name'] }}", "missing field: 'dict object' has no attribute 'First Name'"
                                   " (if it may be absent, give it a default: record['First Name'] | default(''))"),
    ("{{ recrod.Email }}", "missing field: 'recrod' is undefined (known names: cursor, flow, mapped, now, record, source, steps)"),
    ({"to": ["{{ record.Missing }}"]}, "missing field: 'dict object' has no attribute 'Missing'"
                                       " (if it may be absent, give it a default: record.Missing | default(''))"),
], ids=["single", "in-text", "nested", "chained", "subscript", "unknown-name", "inside-table"])
def test_a_missing_field_is_a_render_error_naming_it(templates, context, template, message):
    with pytest.raises(RenderError) as caught:
        templates.render(template, context)
    assert str(caught.value) == message


def test_a_missing_field_is_an_error_in_html_too(templates, context):
    with pytest.raises(RenderError, match=r"^missing field: 'dict object' has no attribute 'Missing' \(.* record.Missing \| default"):
        templates.render("<p>{{ record.Missing }}</p>", context, autoescape=True)


def test_an_explicit_default_or_test_still_works(templates, context):
    assert templates.render("{{ record.Missing | default('n/a') }}", context) == "n/a"
    assert templates.render("{{ record.Missing is defined }}", context) is False


@pytest.mark.parametrize("template, message", [
    ("{{ record.Amount / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ record.FirstName + 1 }}", 'TypeError: can only concatenate str (not "int") to str'),
], ids=["zero-division", "type-error"])
def test_a_failing_expression_is_a_render_error(templates, context, template, message):
    with pytest.raises(RenderError) as caught:
        templates.render(template, context)
    assert str(caught.value) == message


# --- the sandbox and record data -----------------------------------------------


@pytest.mark.parametrize("template, blocked", [
    ("{{ record.__class__ }}", "'__class__' of 'dict'"),
    ("x {{ record.__class__.__mro__ }}", "'__class__' of 'dict'"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'str'"),
    ("{{ record.Amount.__class__.__base__.__subclasses__() }}", "'__class__' of 'int'"),
    ("{{ cycler.__init__.__globals__ }}", "'__init__' of 'type'"),
    ("{{ lipsum.__globals__ }}", "'__globals__' of 'function'"),
    ("{{ '{0.__class__}'.format(record) }}", "'__class__' of 'dict'"),
], ids=["class", "mro-in-text", "subclasses", "int-base", "globals-via-init", "globals", "str-format"])
def test_the_sandbox_blocks_attribute_tricks(templates, context, template, blocked):
    with pytest.raises(RenderError) as caught:
        templates.render(template, context)
    assert str(caught.value) == f"not allowed in a template: access to attribute {blocked} object is unsafe."


def test_the_sandbox_blocks_a_huge_range(templates, context):
    with pytest.raises(RenderError, match="^OverflowError: Range too big"):
        templates.render("{{ range(10**9) | list | length }}", context)


@pytest.mark.parametrize("template, expected", [
    ("{{ record.Comment }}", "{{ 7*7 }} {% if true %}x{% endif %}"),
    ("Note: {{ record.Comment }}", "Note: {{ 7*7 }} {% if true %}x{% endif %}"),
    ({"c": ["{{ record.Comment }}"]}, {"c": ["{{ 7*7 }} {% if true %}x{% endif %}"]}),
], ids=["single", "in-text", "in-table"])
def test_template_syntax_inside_a_record_value_is_printed_not_evaluated(templates, context, template, expected):
    assert templates.render(template, context) == expected


def test_autoescape_escapes_record_html(templates, context):
    html = templates.render("<p>{{ record.Html }}</p>", context, autoescape=True)
    assert html == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"


def test_autoescape_applies_to_a_single_expression_too(templates, context):
    assert templates.render("{{ record.Html }}", context, autoescape=True) == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert templates.render("{{ record.Html }}", context) == "<script>alert(1)</script>"  # text fields are not escaped


# --- tojson ------------------------------------------------------------------------


def test_tojson_keeps_non_ascii_readable(templates, context):
    assert templates.render("{{ record.Address | tojson }}", context) == '{"City": "Köln", "Zip": "50667"}'
    assert templates.render("Name: {{ record.FirstName | tojson }}", context) == 'Name: "Zoë"'


def test_tojson_indents(templates, context):
    assert templates.render("{{ record.Address | tojson(indent=2) }}", context) == '{\n  "City": "Köln",\n  "Zip": "50667"\n}'


def test_tojson_in_html_is_escaped(templates, context):
    assert templates.render("<pre>{{ record.Tags | tojson }}</pre>", context, autoescape=True) == "<pre>[&#34;a&#34;, &#34;b&#34;]</pre>"


# --- evaluate ------------------------------------------------------------------------


@pytest.mark.parametrize("expression, expected", [
    ("record.Email | lower == 'zoe.mueller@example.invalid'", True),
    ("record.Amount > 100", False),
    ("record.Tags | length", 2),
    ("record.Address.City", "Köln"),
    ("'b' in record.Tags and not record.Active", True),
], ids=["filter-compare", "false", "number", "string", "boolean-logic"])
def test_evaluate_returns_the_expression_value(templates, context, expression, expected):
    value = templates.evaluate(expression, context)
    assert value == expected and type(value) is type(expected)


def test_evaluate_is_strict_and_sandboxed(templates, context):
    with pytest.raises(RenderError, match=r"^missing field: 'dict object' has no attribute 'Statsu' \(.* record.Statsu \| default"):
        templates.evaluate("record.Statsu != 'Spam'", context)
    with pytest.raises(RenderError, match="^not allowed in a template: "):
        templates.evaluate("record.__class__", context)


# --- check_step: syntax errors become config errors -------------------------------


@pytest.mark.parametrize("step, field, message", [
    (FilterStep(kind="filter", when="record.Status !="), "when",
     "'record.Status !=' is not a valid template: unexpected 'end of template'"),
    (MapStep(kind="map", fields={"email": "{{ record.Email | lower }"}), "fields.email",
     "'{{ record.Email | lower }' is not a valid template: unexpected '}'"),
    (MapStep(kind="map", fields={"a": {"b": ["ok", "{{ x"]}}), "fields.a.b[1]",
     "'{{ x' is not a valid template: unexpected end of template, expected 'end of print statement'."),
    (ActionStep.model_validate({"kind": "action", "action": "mail > message > send", "subject": "{% if %}"}), "subject",
     "'{% if %}' is not a valid template: Expected an expression, got 'end of statement block'"),
    (ActionStep.model_validate({"kind": "action", "action": "crm > leads > create", "body": {"x": ["{{ ok }}", "{{ 1 + }}"]}}), "body.x[1]",
     "'{{ 1 + }}' is not a valid template: unexpected 'end of template'"),
], ids=["filter", "map", "map-nested", "action-input", "action-body"])
def test_check_step_raises_for_bad_syntax_naming_the_field(templates, step, field, message):
    with pytest.raises(TemplateSyntaxProblem) as caught:
        templates.check_step(step)
    assert (caught.value.field, str(caught.value)) == (field, message)


@pytest.mark.parametrize("step", [
    FilterStep(kind="filter", when="record.Status != 'Spam'"),
    MapStep(kind="map", fields={"a": "{{ record.Missing }}", "n": 5, "l": [1, "{{ y }}"], "t": "plain"}),
    ActionStep.model_validate({"kind": "action", "action": "crm > leads > upsert", "body": "mapped"}),
], ids=["filter", "map", "action"])
def test_check_step_accepts_good_syntax_without_rendering(templates, step):
    templates.check_step(step)  # an unknown name is a per-record error, not a syntax error
    assert templates.render("{{ 1 + 1 }}", {}) == 2  # and the shared cache still works after checking


def test_a_jinja_comment_is_not_sent(templates, context):
    assert templates.render("{# internal note #}Hello {{ record.FirstName }}", context) == "Hello Zoë"
    assert templates.render("{# internal note #}Hello", context) == "Hello"


@pytest.mark.parametrize("template, pieces", [
    ("a@x.invalid, {{ record.Email }}", ["a@x.invalid", "{{ record.Email }}"]),
    ('{{ record.a ~ "," ~ record.b }}', ['{{ record.a ~ "," ~ record.b }}']),
    ("{% if record.vip %}boss@x.invalid{% endif %}, ops@x.invalid", ["{% if record.vip %}boss@x.invalid{% endif %}", "ops@x.invalid"]),
    (" , ", []),
])
def test_address_templates_split_on_commas_outside_tags(template, pieces):
    from agent.templates import split_outside_tags

    assert split_outside_tags(template) == pieces

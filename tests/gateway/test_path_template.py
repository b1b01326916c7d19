"""Path templates: parsing per google/api/http.proto and matching raw request paths."""

import pytest

from services.gateway.path_template import PathTemplateError, SegmentKind, parse_path_template


def components(path: str) -> list[str]:
    return path[1:].split("/")


def test_a_variable_without_a_sub_template_matches_one_segment():
    template = parse_path_template("/v1/things/{id}")

    assert template.match(components("/v1/things/t-1")) == {"id": "t-1"}
    assert template.match(components("/v1/things/a/b")) is None


def test_a_resource_name_variable_captures_its_literal_prefix():
    template = parse_path_template("/v1/{name=tenants/*/apiKeys/*}")

    assert template.match(components("/v1/tenants/t1/apiKeys/k1")) == {"name": "tenants/t1/apiKeys/k1"}
    assert template.match(components("/v1/tenants/t1/keys/k1")) is None


def test_a_nested_field_path_is_kept_dotted():
    template = parse_path_template("/v1/{provider.name=providers/*}")

    assert template.match(components("/v1/providers/p1")) == {"provider.name": "providers/p1"}


def test_a_double_wildcard_captures_any_number_of_segments():
    template = parse_path_template("/v1/files/{path=**}/raw")

    assert template.match(components("/v1/files/a/b/c.txt/raw")) == {"path": "a/b/c.txt"}


def test_the_verb_is_split_from_the_last_segment():
    template = parse_path_template("/v1/{name=campaigns/*}:start")

    assert template.verb == "start"
    assert template.split_verb(components("/v1/campaigns/c1:start")) == ["v1", "campaigns", "c1"]
    assert template.split_verb(components("/v1/campaigns/c1:cancel")) is None


def test_a_template_without_verb_keeps_colons_in_ids():
    template = parse_path_template("/v1/things/{id}")

    parts = template.split_verb(components("/v1/things/urn:x:1"))
    assert parts is not None
    assert template.match(parts) == {"id": "urn:x:1"}


def test_single_segment_values_are_fully_percent_decoded():
    template = parse_path_template("/v1/things/{id}")

    assert template.match(components("/v1/things/a%2Fb%20c")) == {"id": "a/b c"}


def test_multi_segment_values_keep_encoded_slashes():
    template = parse_path_template("/v1/{name=things/*}")

    assert template.match(components("/v1/things/a%2Fb%20c")) == {"name": "things/a%2Fb c"}


def test_empty_segments_do_not_bind_variables():
    template = parse_path_template("/v1/things/{id}")

    assert template.match(components("/v1/things/")) is None


def test_parsed_segments_expose_literals_and_wildcards():
    template = parse_path_template("/v1/{name=messages/*}/events")

    assert [segment.kind for segment in template.segments] == [
        SegmentKind.LITERAL,
        SegmentKind.LITERAL,
        SegmentKind.SINGLE,
        SegmentKind.LITERAL,
    ]
    assert template.variables[0].start == 1 and template.variables[0].end == 3


@pytest.mark.parametrize(
    "source",
    ["v1/things", "/v1/{id", "/v1/{a{b}}", "/v1/{na me}", "/v1/{id}/{id}", "/v1/things:", "/v1//x"],
)
def test_malformed_templates_are_rejected(source):
    with pytest.raises(PathTemplateError):
        parse_path_template(source)

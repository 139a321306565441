"""mergesmith.schema: strict checks of YAML data against dataclasses, with every fault reported
and the result salvaged where a faulty key can be left out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergesmith.schema import CHECK, Fault, check, field_names


def _even(value: int) -> str | None:
    return None if value % 2 == 0 else "must be even"


@dataclass(frozen=True)
class Item:
    name: str
    size: int = field(default=0, metadata={CHECK: _even})


@dataclass(frozen=True)
class Doc:
    title: str
    items: list[Item] | None = None
    tags: dict[str, Item] | None = None
    source: str | dict[str, Any] | None = None
    flag: bool = False
    extra: dict[str, Any] | None = None


def test_a_well_formed_document_becomes_the_dataclasses():
    data = {"title": "t", "items": [{"name": "a", "size": 2}], "tags": {"x": {"name": "b"}}}
    doc, faults = check(data, Doc)
    assert faults == []
    assert doc == Doc("t", [Item("a", 2)], {"x": Item("b", 0)})


def test_nothing_is_coerced():
    doc, faults = check({"title": 7, "flag": 1}, Doc)
    assert doc is None  # the title is required
    assert [(f.path, f.kind) for f in faults] == [(("title",), "invalid"), (("flag",), "invalid")]
    assert faults[0].message == "expected a string"
    assert faults[1].message == "expected true or false"
    # YAML's true is not a count.
    _, faults = check({"title": "t", "items": [{"name": "a", "size": True}]}, Doc)
    assert faults == [Fault(("items", 0, "size"), "invalid", "expected a whole number")]


def test_a_faulty_optional_key_is_left_out_and_the_rest_kept():
    doc, faults = check({"title": "t", "flag": "yes", "colour": 1, "extra": {"k": [1]}}, Doc)
    assert doc == Doc("t", extra={"k": [1]})
    assert faults == [
        Fault(("colour",), "unknown_key"),
        Fault(("flag",), "invalid", "expected true or false"),
    ]


def test_a_faulty_list_item_or_required_key_loses_the_result():
    doc, faults = check({"title": "t", "items": [{"name": "a"}, {"size": 2}]}, Doc)
    assert doc is None
    assert faults == [Fault(("items", 1, "name"), "missing")]
    doc, faults = check({"title": "t", "items": ["a"]}, Doc)
    assert doc is None
    assert faults == [Fault(("items", 0), "invalid", "expected a mapping of keys")]


def test_a_faulty_entry_of_a_mapping_is_dropped():
    doc, faults = check({"title": "t", "tags": {"x": "plain", "y": {"name": "b"}, 3: {}}}, Doc)
    assert doc == Doc("t", tags={"y": Item("b")})
    assert faults == [
        Fault(("tags", "x"), "invalid", "expected a mapping of keys"),
        Fault(("tags", 3), "invalid", "a key here must be a string"),
    ]


def test_a_union_reports_the_member_of_the_same_kind():
    doc, faults = check({"title": "t", "source": {"kind": "zero"}}, Doc)
    assert doc == Doc("t", source={"kind": "zero"})
    doc, faults = check({"title": "t", "source": 5}, Doc)
    assert doc == Doc("t")
    assert faults == [Fault(("source",), "invalid", "expected a string or a mapping")]


def test_a_fields_own_check_runs_on_a_well_typed_value():
    doc, faults = check({"title": "t", "tags": {"x": {"name": "a", "size": 3}}}, Doc)
    assert faults == [Fault(("tags", "x", "size"), "invalid", "must be even")]
    assert doc == Doc("t", tags={"x": Item("a")})  # size left out: its default stands


def test_the_input_is_never_modified_and_mappings_are_copies():
    params = {"weight": 1}
    data = {"title": "t", "extra": params}
    doc, _ = check(data, Doc)
    assert doc is not None and doc.extra == params and doc.extra is not params


def test_field_names_in_declaration_order():
    assert field_names(Doc) == ["title", "items", "tags", "source", "flag", "extra"]

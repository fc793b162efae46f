"""Tests for ctrlora_core.prompts: dental file names, templates and sidecar prompts."""
from __future__ import annotations

import re

import pytest

from ctrlora_core.prompts import (
    DEFAULT_TEMPLATE,
    DentalTags,
    PromptError,
    PromptTemplate,
    parse_dental_name,
    read_sidecar_prompt,
)


@pytest.mark.parametrize(
    ("name", "jaw", "view", "detail"),
    [
        ("upper_front_0001.png", "upper", "front", ""),
        ("lower_left_12.png", "lower", "left", ""),
        ("Upper_Front_0003.PNG", "upper", "front", ""),
        ("upper_front_0001_v2.png", "upper", "front", ""),
        ("lower-bottom-7.jpg", "lower", "bottom", ""),
        ("upper top 3.png", "upper", "top", ""),
        ("LOWER_RIGHT.png", "lower", "right", ""),
        ("upper__-front_1.png", "upper", "front", ""),
        ("renders/set_a/lower_top_0002.png", "lower", "top", ""),
        ("upper.front.png", "upper", "front", ""),
        # the first user's names: map prefixes, ids between jaw and view, compound views, trailing tags
        ("upper_AB12CD34_left.png", "upper", "left", ""),
        ("lower_patient7_bottom.png", "lower", "bottom", ""),
        ("lighting_lower_patient7_bottom.png", "lower", "bottom", ""),
        ("seg_lower_patient7_bottom.png", "lower", "bottom", ""),
        ("matt_upper_smith_right_1.png", "upper", "right", ""),
        ("unlit_upper_smith_front_top_left.png", "upper", "front", "top left"),
        ("lower_XY12ZW34_front_slightly_up.png", "lower", "front", "slightly up"),
        ("upper_AB12CD34_front_weight_5.png", "upper", "front", ""),
        ("upper_0001_front.png", "upper", "front", ""),
        # anatomical jaw words; the same jaw twice is fine
        ("maxilla_front.png", "upper", "front", ""),
        ("Maxillary-Left-2.png", "upper", "left", ""),
        ("mandible_top.png", "lower", "top", ""),
        ("mandibular.id9.right.down.png", "lower", "right", "down"),
        ("upper_maxilla_bottom.png", "upper", "bottom", ""),
        # the detail stops at the first word that is not a direction; a view word before the jaw is ignored
        ("upper_front_top_0007_left.png", "upper", "front", "top"),
        ("left_upper_front.png", "upper", "front", ""),
    ],
)
def test_parse_good_names(name, jaw, view, detail):
    assert parse_dental_name(name) == DentalTags(jaw, view, detail)


def test_tags_without_detail_compare_equal_to_jaw_and_view():
    assert parse_dental_name("upper_front.png") == DentalTags("upper", "front")
    assert parse_dental_name("upper_front.png").view_detail == ""


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("front_upper_0001.png", "no view word after the jaw word 'upper' (words found: front, upper, 0001)"),
        ("middle_front_0001.png", "no jaw word (words found: middle, front, 0001)"),
        ("upper_back_0001.png", "no view word after the jaw word 'upper'"),
        ("upper_frontal_0001.png", "no view word after the jaw word 'upper'"),  # a view must be a whole word
        ("upperfront_0001.png", "no jaw word"),  # no separator
        ("upper.png", "no view word after the jaw word 'upper' (words found: upper)"),
        ("", "no jaw word (words found: none)"),
        ("lighting_patient7_bottom.png", "no jaw word"),
        ("upper_lower_front.png", "names both jaws (upper, lower)"),
        ("maxilla_patient_mandible_left.png", "names both jaws (maxilla, mandible)"),
    ],
)
def test_bad_names_raise_naming_the_file_what_was_found_and_the_expected_form(name, problem):
    with pytest.raises(PromptError) as info:
        parse_dental_name(name)
    message = str(info.value)
    assert message.startswith(f"{name}: {problem}")
    assert "upper, maxilla, maxillary, lower, mandible, mandibular" in message
    assert "top, front, bottom, left, right" in message


def test_prompt_error_is_a_value_error():
    assert issubclass(PromptError, ValueError)


def test_default_prompt_for_a_file():
    assert PromptTemplate().for_file("upper_front_0001.png") == (
        "a 3D dental model of upper teeth, front view, with professional lighting, "
        "high quality, detailed, dental photography, clinical lighting setup"
    )
    assert PromptTemplate().template == DEFAULT_TEMPLATE


def test_custom_template_and_literal_braces():
    template = PromptTemplate("{view} view of the {jaw} jaw {{render}}")
    assert template.for_file("Lower_Left_9.png") == "left view of the lower jaw {render}"
    assert PromptTemplate("no placeholders").render("upper", "top") == "no placeholders"


def test_view_detail_placeholder():
    template = PromptTemplate("{jaw} teeth, {view} view ({view_detail})")
    assert template.for_file("unlit_upper_smith_front_top_left.png") == "upper teeth, front view (top left)"
    assert template.for_file("upper_front_1.png") == "upper teeth, front view ()"
    assert template.render("lower", "front", "slightly up") == "lower teeth, front view (slightly up)"
    for detail in ("sideways", "top  left", " top", "Top"):
        with pytest.raises(PromptError, match="view detail: expected words from top, front, bottom, left, right, "
                                              "up, down, slightly"):
            template.render("upper", "front", detail)


@pytest.mark.parametrize(
    ("template", "placeholder"),
    [
        ("{jaw} {teeth}", "{teeth}"),
        ("{jaw!r} teeth", "{jaw!r}"),
        ("{view:>10}", "{view:>10}"),
        ("{} teeth", "{}"),
        ("{0} teeth", "{0}"),
        ("{jaw.upper}", "{jaw.upper}"),
    ],
)
def test_template_rejects_unknown_placeholders_by_name(template, placeholder):
    with pytest.raises(PromptError, match=f"unknown placeholder {re.escape(placeholder)};"):
        PromptTemplate(template)


def test_template_rejects_unbalanced_braces():
    with pytest.raises(PromptError, match="prompt template '{jaw teeth'"):
        PromptTemplate("{jaw teeth")


def test_render_checks_values():
    with pytest.raises(PromptError, match="jaw: expected one of upper, lower, got 'middle'"):
        PromptTemplate().render(jaw="middle", view="top")
    with pytest.raises(PromptError, match="view: expected one of top, front, bottom, left, right, got 'Top'"):
        PromptTemplate().render(jaw="upper", view="Top")


def test_sidecar_prompt(tmp_path):
    image = tmp_path / "upper_front_0001.png"
    assert read_sidecar_prompt(image) is None
    (tmp_path / "upper_front_0001.txt").write_text("  a molar, side light \n\n", encoding="utf-8")
    assert read_sidecar_prompt(image) == "a molar, side light"
    assert read_sidecar_prompt(str(image)) == "a molar, side light"


def test_sidecar_prompt_strips_bom_and_reports_bad_encoding(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffsmile".encode("utf-8"))
    assert read_sidecar_prompt(tmp_path / "a.jpg") == "smile"
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptError, match=r"b\.txt: prompt file is not valid UTF-8"):
        read_sidecar_prompt(tmp_path / "b.png")

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
    ("name", "jaw", "view"),
    [
        ("upper_front_0001.png", "upper", "front"),
        ("lower_left_12.png", "lower", "left"),
        ("Upper_Front_0003.PNG", "upper", "front"),
        ("upper_front_0001_v2.png", "upper", "front"),
        ("lower-bottom-7.jpg", "lower", "bottom"),
        ("upper top 3.png", "upper", "top"),
        ("LOWER_RIGHT.png", "lower", "right"),
        ("upper__-front_1.png", "upper", "front"),
        ("renders/set_a/lower_top_0002.png", "lower", "top"),
    ],
)
def test_parse_good_names(name, jaw, view):
    assert parse_dental_name(name) == DentalTags(jaw, view)


@pytest.mark.parametrize(
    "name",
    [
        "front_upper_0001.png",  # view before jaw
        "middle_front_0001.png",  # unknown jaw
        "upper_back_0001.png",  # unknown view
        "upper_frontal_0001.png",  # view must be a whole token
        "upperfront_0001.png",  # no separator
        "upper.png",  # no view
        "upper_0001_front.png",  # something between jaw and view
        "",
    ],
)
def test_bad_names_raise_naming_the_file_and_the_expected_form(name):
    with pytest.raises(PromptError) as info:
        parse_dental_name(name)
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert "upper, lower" in message and "top, front, bottom, left, right" in message


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

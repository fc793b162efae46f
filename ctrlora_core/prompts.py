"""Text prompts for the dental dataset, made from image file names.

A file name is split into words at '_', '-', '.' and ' ' (case is ignored, the
extension and any folders are dropped). Two words matter:

- the jaw word: upper or lower (also maxilla/maxillary = upper, mandible/mandibular = lower);
- the view word: the first of top, front, bottom, left, right after the jaw word.

Every other word (map prefixes such as lighting or seg, patient or model ids, numbers,
tags such as weight) is ignored, so all of these parse:

    upper_front_0001.png              -> upper, front
    lighting_lower_patient7_bottom.png -> lower, bottom
    matt_upper_smith_right_1.png      -> upper, right
    unlit_upper_smith_front_top_left.png -> upper, front, detail "top left"
    lower_XY12ZW34_front_slightly_up.png -> lower, front, detail "slightly up"

The direction words right after the view word (DIRECTION_WORDS) are its detail, a
template's {view_detail} ("" when there are none). A name without a jaw word, with
no view word after it, or naming both jaws is refused. The tags fill a
PromptTemplate, by default DEFAULT_TEMPLATE. A `<stem>.txt` file next to an image
(a sidecar) can hold a hand-written prompt instead.
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import NamedTuple

from .errors import CtrLoRAError

JAWS: tuple[str, ...] = ("upper", "lower")
VIEWS: tuple[str, ...] = ("top", "front", "bottom", "left", "right")
# Words naming a jaw, and the jaw they name.
JAW_WORDS: dict[str, str] = {"upper": "upper", "maxilla": "upper", "maxillary": "upper",
                             "lower": "lower", "mandible": "lower", "mandibular": "lower"}
# Words that may follow the view word as its detail (front_top_left, front_slightly_up).
DIRECTION_WORDS: tuple[str, ...] = VIEWS + ("up", "down", "slightly")

DEFAULT_TEMPLATE = (
    "a 3D dental model of {jaw} teeth, {view} view, with professional lighting, "
    "high quality, detailed, dental photography, clinical lighting setup"
)

_PLACEHOLDERS = ("jaw", "view", "view_detail")
_SEPARATORS = re.compile(r"[_\-. ]+")
_EXPECTED = (f"expected a jaw word ({', '.join(JAW_WORDS)}) and after it a view word ({', '.join(VIEWS)}), "
             "as words separated by '_', '-', '.' or ' ', e.g. 'lighting_upper_AB12_front_top_left.png'")


class PromptError(CtrLoRAError, ValueError):
    """A file name, template or prompt file does not have the expected form."""


class DentalTags(NamedTuple):
    """Jaw, view and view detail parsed from a file name, lower case (view_detail "" when none)."""

    jaw: str
    view: str
    view_detail: str = ""


def parse_dental_name(name: str | Path) -> DentalTags:
    """Jaw, view and view detail of an image file name (rules in the module docstring)."""
    words = [word for word in _SEPARATORS.split(Path(name).stem.lower()) if word]
    found = f"words found: {', '.join(words) or 'none'}"
    jaw_at = [i for i, word in enumerate(words) if word in JAW_WORDS]
    if not jaw_at:
        raise PromptError(f"{name}: no jaw word ({found}); {_EXPECTED}")
    jaws = sorted({JAW_WORDS[words[i]] for i in jaw_at})
    if len(jaws) > 1:
        named = ", ".join(dict.fromkeys(words[i] for i in jaw_at))
        raise PromptError(f"{name}: names both jaws ({named}); {_EXPECTED}")
    first = jaw_at[0]
    view_at = next((i for i in range(first + 1, len(words)) if words[i] in VIEWS), None)
    if view_at is None:
        raise PromptError(f"{name}: no view word after the jaw word {words[first]!r} ({found}); {_EXPECTED}")
    detail = []
    for word in words[view_at + 1:]:
        if word not in DIRECTION_WORDS:
            break
        detail.append(word)
    return DentalTags(jaws[0], words[view_at], " ".join(detail))


class PromptTemplate:
    """A prompt with the placeholders {jaw}, {view} and {view_detail}, checked when constructed."""

    def __init__(self, template: str = DEFAULT_TEMPLATE):
        try:
            fields = list(string.Formatter().parse(template))
        except ValueError as err:
            raise PromptError(f"prompt template {template!r}: {err}") from err
        for _, field, format_spec, conversion in fields:
            if field is None:
                continue
            if field not in _PLACEHOLDERS or format_spec or conversion:
                placeholder = "{" + field + (f"!{conversion}" if conversion else "")
                placeholder += (f":{format_spec}" if format_spec else "") + "}"
                raise PromptError(
                    f"prompt template {template!r}: unknown placeholder {placeholder}; "
                    "only {jaw}, {view} and {view_detail} are allowed (write {{ and }} for literal braces)"
                )
        self.template = template

    def render(self, jaw: str, view: str, view_detail: str = "") -> str:
        """Fill in the template; jaw must be in JAWS, view in VIEWS, view_detail words in DIRECTION_WORDS."""
        if jaw not in JAWS:
            raise PromptError(f"jaw: expected one of {', '.join(JAWS)}, got {jaw!r}")
        if view not in VIEWS:
            raise PromptError(f"view: expected one of {', '.join(VIEWS)}, got {view!r}")
        if view_detail and any(word not in DIRECTION_WORDS for word in view_detail.split(" ")):
            raise PromptError(f"view detail: expected words from {', '.join(DIRECTION_WORDS)} separated by "
                              f"single spaces, got {view_detail!r}")
        return self.template.format(jaw=jaw, view=view, view_detail=view_detail)

    def for_file(self, name: str | Path) -> str:
        """Prompt for an image file name (see parse_dental_name)."""
        return self.render(*parse_dental_name(name))


def read_sidecar_prompt(image_path: str | Path) -> str | None:
    """Prompt from `<stem>.txt` next to the image, stripped; None when there is no such file."""
    sidecar = Path(image_path).with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise PromptError(f"{sidecar}: prompt file is not valid UTF-8 ({err})") from err

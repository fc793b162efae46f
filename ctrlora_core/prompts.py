"""Text prompts for the dental dataset, made from image file names.

A file name starts with the jaw, then the view, separated by '_', '-' or ' ';
case is ignored and anything after the view is ignored too:

    upper_front_0001.png, lower-left-12.png, Upper_Front_0003.PNG, upper_front_0001_v2.png

The jaw is one of JAWS and the view one of VIEWS. The pair fills a PromptTemplate,
by default DEFAULT_TEMPLATE. A `<stem>.txt` file next to an image (a sidecar)
can hold a hand-written prompt instead.
"""
from __future__ import annotations

import re
import string
from pathlib import Path
from typing import NamedTuple

from .errors import CtrLoRAError

JAWS: tuple[str, ...] = ("upper", "lower")
VIEWS: tuple[str, ...] = ("top", "front", "bottom", "left", "right")

DEFAULT_TEMPLATE = (
    "a 3D dental model of {jaw} teeth, {view} view, with professional lighting, "
    "high quality, detailed, dental photography, clinical lighting setup"
)

_PLACEHOLDERS = ("jaw", "view")
_SEPARATORS = re.compile(r"[_\- ]+")


class PromptError(CtrLoRAError, ValueError):
    """A file name, template or prompt file does not have the expected form."""


class DentalTags(NamedTuple):
    """Jaw and view parsed from a file name, lower case."""

    jaw: str
    view: str


def parse_dental_name(name: str | Path) -> DentalTags:
    """Parse '<jaw><sep><view>[<sep>anything].<ext>' (the directory part is ignored)."""
    tokens = [token for token in _SEPARATORS.split(Path(name).stem.lower()) if token]
    jaw = tokens[0] if tokens else ""
    view = tokens[1] if len(tokens) > 1 else ""
    if jaw not in JAWS or view not in VIEWS:
        raise PromptError(
            f"{name}: expected a file name starting with the jaw ({', '.join(JAWS)}) "
            f"then the view ({', '.join(VIEWS)}), separated by '_', '-' or ' ', "
            f"e.g. 'upper_front_0001.png'; got jaw {jaw!r}, view {view!r}"
        )
    return DentalTags(jaw, view)


class PromptTemplate:
    """A prompt with the placeholders {jaw} and {view}, checked when constructed."""

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
                    "only {jaw} and {view} are allowed (write {{ and }} for literal braces)"
                )
        self.template = template

    def render(self, jaw: str, view: str) -> str:
        """Fill in the template; jaw must be in JAWS and view in VIEWS."""
        if jaw not in JAWS:
            raise PromptError(f"jaw: expected one of {', '.join(JAWS)}, got {jaw!r}")
        if view not in VIEWS:
            raise PromptError(f"view: expected one of {', '.join(VIEWS)}, got {view!r}")
        return self.template.format(jaw=jaw, view=view)

    def for_file(self, name: str | Path) -> str:
        """Prompt for an image file name (see parse_dental_name)."""
        tags = parse_dental_name(name)
        return self.render(tags.jaw, tags.view)


def read_sidecar_prompt(image_path: str | Path) -> str | None:
    """Prompt from `<stem>.txt` next to the image, stripped; None when there is no such file."""
    sidecar = Path(image_path).with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        return sidecar.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise PromptError(f"{sidecar}: prompt file is not valid UTF-8 ({err})") from err

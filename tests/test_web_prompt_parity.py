"""The Dental Prompt node's live text (web/lib/prompt.js, run under Node.js) matches
ctrlora_core.prompts: same prompt for valid input, an error for the same invalid input."""
from __future__ import annotations

from ctrlora_core.prompts import (
    DEFAULT_TEMPLATE,
    DIRECTION_WORDS,
    JAW_WORDS,
    JAWS,
    VIEWS,
    PromptError,
    PromptTemplate,
    parse_dental_name,
)
import pytest

from ComfyUI_CtrLoRA.nodes.dental import CtrLoRADentalPrompt
from node_js import requires_node, run_js

pytestmark = requires_node

FILE_NAMES = [
    "upper_front_0001.png", "lower-left-12.png", "Upper_Front_0003.PNG", "upper_front_0001_v2.png",
    "renders/lower_right.png", "renders/sub/UPPER  top.jpg", "lower__bottom", "upper_front.", "upper.front.png",
    "front_upper.png", "upper.png", "upper_side.png", "", "_upper_front.png", "-lower-top-", "lower_top/",
    "a/./upper_left.png", "upper_front_", "Lower_Bottom.tar.gz",
    # the first user's shapes, anatomical jaw words, details, refusals
    "upper_AB12CD34_left.png", "lower_patient7_bottom.png", "lighting_lower_patient7_bottom.png",
    "seg_lower_patient7_bottom.png", "matt_upper_smith_right_1.png", "unlit_upper_smith_front_top_left.png",
    "lower_XY12ZW34_front_slightly_up.png", "upper_AB12CD34_front_weight_5.png", "Maxillary-Left-2.png",
    "mandibular.id9.right.down.png", "upper_maxilla_bottom.png", "upper_front_top_0007_left.png",
    "left_upper_front.png", "upper_lower_front.png", "maxilla_x_mandible_left.png", "upper_0001_front.png",
    "constructor_upper_front.png", "upper_front_toString.png", "hasOwnProperty_front.png",
]
TEMPLATES = [
    DEFAULT_TEMPLATE, "{jaw} {view}", "no placeholders", "{{jaw}} is literal, {jaw} is not", "}}{{", "{view}{view}",
    "{jaw", "jaw}", "{}", "{teeth}", "{jaw!r}", "{jaw:>10}", "{jaw}}", "{ jaw}", "{jaw[0]}", "{toString}", "{{{jaw}}}",
    "{view} ({view_detail})", "{view_detail}", "{view_detail!s}", "{viewDetail}",
]
DETAILS = ["", "top left", "slightly up", "sideways", "top  left", " top", "Top"]


def _python(kind: str, *args: str) -> str | None:
    """The core's answer, None for a PromptError."""
    try:
        if kind == "parse":
            return "/".join(parse_dental_name(args[0]))
        template, jaw, view, detail = args
        return PromptTemplate(template).render(jaw, view, detail)
    except PromptError:
        return None


def test_js_lists_the_same_words():
    got = run_js("prompt.js", "return [lib.JAWS, lib.VIEWS, lib.JAW_WORDS, lib.DIRECTION_WORDS];", None)
    assert got == [list(JAWS), list(VIEWS), JAW_WORDS, list(DIRECTION_WORDS)]


def test_file_names_parse_the_same():
    got = run_js("prompt.js", """
        return data.map((name) => {
            try { const t = lib.parseDentalName(name); return `${t.jaw}/${t.view}/${t.viewDetail}`; }
            catch (err) { return null; }
        });
    """, FILE_NAMES)
    assert dict(zip(FILE_NAMES, got)) == {name: _python("parse", name) for name in FILE_NAMES}
    assert sum(v is not None for v in got) >= 20 and sum(v is None for v in got) >= 6  # both kinds
    assert {v.split("/", 2)[2] for v in got if v} >= {"", "top left", "slightly up", "down"}


def test_parse_errors_carry_the_same_message():
    names = ["", "upper.png", "front_upper_1.png", "upper_lower_front.png", "lighting_patient7_bottom.png"]
    got = run_js("prompt.js", """
        return data.map((name) => {
            try { lib.parseDentalName(name); return null; } catch (err) { return err.message; }
        });
    """, names)
    expected = []
    for name in names:
        with pytest.raises(PromptError) as info:
            parse_dental_name(name)
        expected.append(str(info.value))
    assert got == expected


def test_templates_render_the_same():
    cases = [(t, jaw, view, "") for t in TEMPLATES for jaw, view in (("upper", "front"), ("lower", "left"))]
    cases += [(DEFAULT_TEMPLATE, "middle", "front", ""), (DEFAULT_TEMPLATE, "upper", "back", "")]
    cases += [("{jaw} {view} {view_detail}", "upper", "front", detail) for detail in DETAILS]
    got = run_js("prompt.js", """
        return data.map(([t, jaw, view, detail]) => { try { return lib.renderTemplate(t, jaw, view, detail); }
                                                      catch (err) { return null; } });
    """, cases)
    assert got == [_python("render", *case) for case in cases]
    assert sum(v is not None for v in got) >= 14


def test_file_name_overrides_jaw_and_view_like_the_node():
    """As CtrLoRADentalPrompt: a blank file_name keeps jaw/view, any other is stripped and parsed."""
    file_names = ["lower_left_3.png", "  lower_left_3.png \n", "", "  \t", "seg_upper_p7_front_top_left.png"]
    got = run_js("prompt.js", """
        const args = { jaw: "upper", view: "top", template: "{jaw}-{view}-{view_detail}" };
        return data.map((fileName) => lib.dentalPrompt({ ...args, fileName }));
    """, file_names)
    node = CtrLoRADentalPrompt()
    assert got == [node.prompt("upper", "top", "{jaw}-{view}-{view_detail}", name)[0] for name in file_names]
    assert got == ["lower-left-"] * 2 + ["upper-top-"] * 2 + ["upper-front-top left"]

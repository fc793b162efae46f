"""The Dental Prompt node's live text (web/lib/prompt.js, run under Node.js) matches
ctrlora_core.prompts: same prompt for valid input, an error for the same invalid input."""
from __future__ import annotations

from ctrlora_core.prompts import DEFAULT_TEMPLATE, JAWS, VIEWS, PromptError, PromptTemplate, parse_dental_name
from node_js import requires_node, run_js

pytestmark = requires_node

FILE_NAMES = [
    "upper_front_0001.png", "lower-left-12.png", "Upper_Front_0003.PNG", "upper_front_0001_v2.png",
    "renders/lower_right.png", "renders/sub/UPPER  top.jpg", "lower__bottom", "upper_front.", "upper.front.png",
    "front_upper.png", "upper.png", "upper_side.png", "", "_upper_front.png", "-lower-top-", "lower_top/",
    "a/./upper_left.png", "upper_front_", "Lower_Bottom.tar.gz",
]
TEMPLATES = [
    DEFAULT_TEMPLATE, "{jaw} {view}", "no placeholders", "{{jaw}} is literal, {jaw} is not", "}}{{", "{view}{view}",
    "{jaw", "jaw}", "{}", "{teeth}", "{jaw!r}", "{jaw:>10}", "{jaw}}", "{ jaw}", "{jaw[0]}", "{toString}", "{{{jaw}}}",
]


def _python(kind: str, *args: str) -> str | None:
    """The core's answer, None for a PromptError."""
    try:
        if kind == "parse":
            return "/".join(parse_dental_name(args[0]))
        template, jaw, view = args
        return PromptTemplate(template).render(jaw, view)
    except PromptError:
        return None


def test_js_lists_the_same_jaws_and_views():
    assert run_js("prompt.js", "return [lib.JAWS, lib.VIEWS];", None) == [list(JAWS), list(VIEWS)]


def test_file_names_parse_the_same():
    got = run_js("prompt.js", """
        return data.map((name) => { try { const t = lib.parseDentalName(name); return `${t.jaw}/${t.view}`; }
                                    catch (err) { return null; } });
    """, FILE_NAMES)
    assert dict(zip(FILE_NAMES, got)) == {name: _python("parse", name) for name in FILE_NAMES}
    assert sum(v is not None for v in got) >= 8  # the list is not all errors


def test_templates_render_the_same():
    cases = [(t, jaw, view) for t in TEMPLATES for jaw, view in (("upper", "front"), ("lower", "left"))]
    cases += [(DEFAULT_TEMPLATE, "middle", "front"), (DEFAULT_TEMPLATE, "upper", "back")]
    got = run_js("prompt.js", """
        return data.map(([t, jaw, view]) => { try { return lib.renderTemplate(t, jaw, view); }
                                              catch (err) { return null; } });
    """, cases)
    assert got == [_python("render", *case) for case in cases]
    assert sum(v is not None for v in got) >= 10


def test_file_name_overrides_jaw_and_view_like_the_node():
    """As CtrLoRADentalPrompt: a blank file_name keeps jaw/view, any other is stripped and parsed."""
    file_names = ["lower_left_3.png", "  lower_left_3.png \n", "", "  \t"]
    got = run_js("prompt.js", """
        const args = { jaw: "upper", view: "top", template: "{jaw}-{view}" };
        return data.map((fileName) => lib.dentalPrompt({ ...args, fileName }));
    """, file_names)
    template = PromptTemplate("{jaw}-{view}")
    assert got == [template.for_file("lower_left_3.png")] * 2 + [template.render("upper", "top")] * 2

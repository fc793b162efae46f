// Dental prompt text for the live display on the Dental Prompt node: the same rules as
// ctrlora_core/prompts.py (parse_dental_name, PromptTemplate), checked against it by
// tests/test_web_prompt_parity.py. Pure functions, no DOM.

export const JAWS = ["upper", "lower"];
export const VIEWS = ["top", "front", "bottom", "left", "right"];
export const JAW_WORDS = {
  upper: "upper",
  maxilla: "upper",
  maxillary: "upper",
  lower: "lower",
  mandible: "lower",
  mandibular: "lower",
};
export const DIRECTION_WORDS = [...VIEWS, "up", "down", "slightly"];
const PLACEHOLDERS = ["jaw", "view", "view_detail"];
const EXPECTED =
  `expected a jaw word (${Object.keys(JAW_WORDS).join(", ")}) and after it a view word ` +
  `(${VIEWS.join(", ")}), as words separated by '_', '-', '.' or ' ', ` +
  "e.g. 'lighting_upper_AB12_front_top_left.png'";

/** File name stem, as Python's pathlib.PurePosixPath(name).stem. */
function stem(name) {
  const parts = name.split("/").filter((part) => part !== "" && part !== ".");
  const base = parts.length ? parts[parts.length - 1] : "";
  const dot = base.lastIndexOf(".");
  return dot > 0 && dot < base.length - 1 ? base.slice(0, dot) : base;
}

/** Jaw, view and view detail of a file name (the jaw word, then the first view word after it). */
export function parseDentalName(name) {
  const words = stem(name).toLowerCase().split(/[_\-. ]+/).filter((word) => word);
  const found = `words found: ${words.join(", ") || "none"}`;
  const jawAt = words.flatMap((word, i) => (Object.hasOwn(JAW_WORDS, word) ? [i] : []));
  if (!jawAt.length) throw new Error(`${name}: no jaw word (${found}); ${EXPECTED}`);
  const jaws = [...new Set(jawAt.map((i) => JAW_WORDS[words[i]]))].sort();
  if (jaws.length > 1) {
    const named = [...new Set(jawAt.map((i) => words[i]))].join(", ");
    throw new Error(`${name}: names both jaws (${named}); ${EXPECTED}`);
  }
  const first = jawAt[0];
  const viewAt = words.findIndex((word, i) => i > first && VIEWS.includes(word));
  if (viewAt < 0) {
    throw new Error(`${name}: no view word after the jaw word '${words[first]}' (${found}); ${EXPECTED}`);
  }
  const detail = [];
  for (const word of words.slice(viewAt + 1)) {
    if (!DIRECTION_WORDS.includes(word)) break;
    detail.push(word);
  }
  return { jaw: jaws[0], view: words[viewAt], viewDetail: detail.join(" ") };
}

/**
 * Fill {jaw}, {view} and {view_detail} into a template ('{{' and '}}' are literal braces).
 * Throws on any other placeholder or an unmatched brace, as PromptTemplate does.
 */
export function renderTemplate(template, jaw, view, viewDetail = "") {
  if (!JAWS.includes(jaw)) throw new Error(`jaw: expected one of ${JAWS.join(", ")}, got '${jaw}'`);
  if (!VIEWS.includes(view)) throw new Error(`view: expected one of ${VIEWS.join(", ")}, got '${view}'`);
  if (viewDetail && viewDetail.split(" ").some((word) => !DIRECTION_WORDS.includes(word))) {
    throw new Error(
      `view detail: expected words from ${DIRECTION_WORDS.join(", ")} separated by single spaces, ` +
        `got '${viewDetail}'`,
    );
  }
  const values = { jaw, view, view_detail: viewDetail };
  let out = "";
  let i = 0;
  while (i < template.length) {
    const ch = template[i];
    const doubled = template[i + 1] === ch;
    if ((ch === "{" || ch === "}") && doubled) {
      out += ch;
      i += 2;
    } else if (ch === "}") {
      throw new Error("prompt template: single '}' (write '}}' for a literal brace)");
    } else if (ch === "{") {
      const end = template.indexOf("}", i);
      if (end < 0) throw new Error("prompt template: '{' without a closing '}' (write '{{' for a literal brace)");
      const field = template.slice(i + 1, end);
      if (!PLACEHOLDERS.includes(field)) {
        throw new Error(
          `prompt template: unknown placeholder {${field}}; only {jaw}, {view} and {view_detail} are allowed`,
        );
      }
      out += values[field];
      i = end + 1;
    } else {
      out += ch;
      i += 1;
    }
  }
  return out;
}

/** The Dental Prompt node's output: the tags come from fileName when it is not blank (it is trimmed). */
export function dentalPrompt({ jaw, view, template, fileName = "" }) {
  const name = fileName.trim();
  const tags = name ? parseDentalName(name) : { jaw, view, viewDetail: "" };
  return renderTemplate(template, tags.jaw, tags.view, tags.viewDetail);
}

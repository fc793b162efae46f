// Dental prompt text for the live display on the Dental Prompt node: the same rules as
// ctrlora_core/prompts.py (parse_dental_name, PromptTemplate), checked against it by
// tests/test_web_prompt_parity.py. Pure functions, no DOM.

export const JAWS = ["upper", "lower"];
export const VIEWS = ["top", "front", "bottom", "left", "right"];

/** File name stem, as Python's pathlib.PurePosixPath(name).stem. */
function stem(name) {
  const parts = name.split("/").filter((part) => part !== "" && part !== ".");
  const base = parts.length ? parts[parts.length - 1] : "";
  const dot = base.lastIndexOf(".");
  return dot > 0 && dot < base.length - 1 ? base.slice(0, dot) : base;
}

/** Jaw and view from '<jaw><sep><view>[<sep>anything].<ext>'; throws when they are not valid. */
export function parseDentalName(name) {
  const tokens = stem(name).toLowerCase().split(/[_\- ]+/).filter((token) => token);
  const jaw = tokens[0] ?? "";
  const view = tokens[1] ?? "";
  if (!JAWS.includes(jaw) || !VIEWS.includes(view)) {
    throw new Error(
      `${name}: expected a file name starting with the jaw (${JAWS.join(", ")}) then the view ` +
        `(${VIEWS.join(", ")}), e.g. 'upper_front_0001.png'; got jaw '${jaw}', view '${view}'`,
    );
  }
  return { jaw, view };
}

/**
 * Fill {jaw} and {view} into a template ('{{' and '}}' are literal braces).
 * Throws on any other placeholder or an unmatched brace, as PromptTemplate does.
 */
export function renderTemplate(template, jaw, view) {
  if (!JAWS.includes(jaw)) throw new Error(`jaw: expected one of ${JAWS.join(", ")}, got '${jaw}'`);
  if (!VIEWS.includes(view)) throw new Error(`view: expected one of ${VIEWS.join(", ")}, got '${view}'`);
  const values = { jaw, view };
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
      if (!Object.hasOwn(values, field)) {
        throw new Error(`prompt template: unknown placeholder {${field}}; only {jaw} and {view} are allowed`);
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

/** The Dental Prompt node's output: jaw/view come from fileName when it is not blank (it is trimmed). */
export function dentalPrompt({ jaw, view, template, fileName = "" }) {
  const name = fileName.trim();
  const tags = name ? parseDentalName(name) : { jaw, view };
  return renderTemplate(template, tags.jaw, tags.view);
}

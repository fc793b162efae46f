// Lighting + segmentation blend for the live preview: the same formulas as
// ctrlora_core/conditions.py (blend_lighting_seg), checked against it by
// tests/test_web_blend_parity.py. Pure functions, no DOM: the tests run them under node.
//
// Per pixel and channel, with l (lighting, the base layer) and s (segmentation) in [0, 1]:
//   alpha      f = s
//   multiply   f = l * s
//   screen     f = 1 - (1 - l) * (1 - s)
//   overlay    f = 2 * l * s if l < 0.5, else 1 - 2 * (1 - l) * (1 - s)
//   soft_light f = (1 - 2 * s) * l * l + 2 * s * l          (pegtop)
//   result = clamp((1 - alpha) * l + alpha * f, 0, 1)
// A map whose Load Image mask is connected is first flattened over a flat colour as
// ctrlora_core.conditions.flatten_alpha does: v * (1 - t) + background * t, t = 1 - a / 255.

export const BLEND_MODES = ["alpha", "multiply", "screen", "overlay", "soft_light"];
// The colours transparent maps are flattened over: black for the lighting map, the dental
// palette's background for the segmentation map (ctrlora_core.conditions.DENTAL_PALETTE).
export const FLATTEN_COLOURS = { lighting: [0, 0, 0], segmentation: [56, 56, 56] };

const MODE_FORMULAS = {
  alpha: (l, s) => s,
  multiply: (l, s) => l * s,
  screen: (l, s) => 1 - (1 - l) * (1 - s),
  overlay: (l, s) => (l < 0.5 ? 2 * l * s : 1 - 2 * (1 - l) * (1 - s)),
  soft_light: (l, s) => (1 - 2 * s) * l * l + 2 * s * l,
};

/** Throw an Error with the same wording as the Python checks unless mode and alpha are valid. */
export function checkBlendArgs(alpha, mode) {
  if (!BLEND_MODES.includes(mode)) {
    throw new Error(`blend mode: unknown mode '${mode}'; valid modes: ${BLEND_MODES.join(", ")}`);
  }
  if (!(alpha >= 0 && alpha <= 1)) {
    throw new Error(`blend alpha: must be in [0, 1], got ${alpha}`);
  }
}

/** Blend one channel value: l and s are floats in [0, 1]; returns a float in [0, 1]. */
export function blendValue(l, s, alpha, mode) {
  checkBlendArgs(alpha, mode);
  return blendUnchecked(l, s, alpha, MODE_FORMULAS[mode]);
}

function blendUnchecked(l, s, alpha, formula) {
  const x = (1 - alpha) * l + alpha * formula(l, s);
  return Math.min(1, Math.max(0, x));
}

/** Float in [0, 1] -> byte, rounded half to even like numpy (ctrlora_core.conditions.tensor_to_image). */
export function toByte(x) {
  const scaled = x * 255;
  let rounded = Math.round(scaled);
  if (rounded - scaled === 0.5 && rounded % 2 !== 0) rounded -= 1;
  return Math.min(255, Math.max(0, rounded));
}

/** Channel c of pixel i in [0, 1], flattened over `colour` (8-bit RGB) by its alpha when colour is given. */
function channel(pixels, i, c, colour) {
  const value = pixels[i + c] / 255;
  if (!colour) return value;
  const t = 1 - pixels[i + 3] / 255;
  return value * (1 - t) + (colour[c] / 255) * t;
}

/**
 * Blend two RGBA byte images of the same size (canvas ImageData.data layout).
 * Alpha channels are ignored, as the Python blend drops a 4th channel, unless `flatten`
 * gives a colour for that input ({ lighting, segmentation }: 8-bit RGB); the result is opaque.
 * Returns a new Uint8ClampedArray.
 */
export function blendRGBA(lighting, seg, alpha, mode, flatten = {}) {
  checkBlendArgs(alpha, mode);
  if (lighting.length !== seg.length || lighting.length % 4 !== 0) {
    throw new Error(`lighting and seg must have the same size: ${lighting.length / 4} vs ${seg.length / 4} pixels`);
  }
  const formula = MODE_FORMULAS[mode];
  const out = new Uint8ClampedArray(lighting.length);
  for (let i = 0; i < lighting.length; i += 4) {
    for (let c = 0; c < 3; c++) {
      const l = channel(lighting, i, c, flatten.lighting);
      const s = channel(seg, i, c, flatten.segmentation);
      out[i + c] = toByte(blendUnchecked(l, s, alpha, formula));
    }
    out[i + 3] = 255;
  }
  return out;
}

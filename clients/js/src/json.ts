/**
 * JSON text -> values, keeping integers exact: an integer literal outside the safe range of a
 * float64 (|n| > 2^53 - 1) becomes a `bigint`, so a task's 64-bit seed survives parsing
 * (`JSON.parse` would round 2^63 + 1 to 2^63). Everything else is as `JSON.parse` gives it.
 * Bad text raises a SyntaxError naming the position.
 */
export type Json = null | boolean | number | bigint | string | Json[] | { [key: string]: Json };

const MAX_DEPTH = 64;

export function parseJson(text: string): Json {
  let i = 0;
  const fail = (what: string): never => {
    throw new SyntaxError(`JSON: ${what} at position ${i}`);
  };
  const ws = () => {
    while (i < text.length) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) i++;
      else break;
    }
  };
  const value = (depth: number): Json => {
    if (depth > MAX_DEPTH) fail("nested too deeply");
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      const out: { [key: string]: Json } = {};
      ws();
      if (text[i] === "}") { i++; return out; }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("expected a string key");
        const key = string();
        ws();
        if (text[i] !== ":") fail("expected ':'");
        i++;
        Object.defineProperty(out, key, { value: value(depth + 1), enumerable: true, writable: true, configurable: true });
        ws();
        if (text[i] === ",") { i++; continue; }
        if (text[i] === "}") { i++; return out; }
        fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      i++;
      const out: Json[] = [];
      ws();
      if (text[i] === "]") { i++; return out; }
      for (;;) {
        out.push(value(depth + 1));
        ws();
        if (text[i] === ",") { i++; continue; }
        if (text[i] === "]") { i++; return out; }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return string();
    if (text.startsWith("true", i)) { i += 4; return true; }
    if (text.startsWith("false", i)) { i += 5; return false; }
    if (text.startsWith("null", i)) { i += 4; return null; }
    return number();
  };
  const string = (): string => {
    const start = i;
    i++;
    let simple = true;
    while (i < text.length && text[i] !== '"') {
      if (text[i] === "\\") { simple = false; i += 2; } else {
        if (text.charCodeAt(i) < 0x20) fail("control character in string");
        i++;
      }
    }
    if (i >= text.length) fail("unterminated string");
    i++;
    const raw = text.slice(start, i);
    return simple ? raw.slice(1, -1) : (JSON.parse(raw) as string);
  };
  const number = (): number | bigint => {
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(text.slice(i, i + 400));
    if (!m) fail("unexpected character");
    i += m![0].length;
    if (m![2] === undefined && m![3] === undefined) {
      const n = Number(m![0]);
      return Number.isSafeInteger(n) ? n : BigInt(m![0]);
    }
    return Number(m![0]);
  };
  const out = value(0);
  ws();
  if (i !== text.length) fail("trailing characters");
  return out;
}

const BIG = "@@baffle-bigint@@";
const BIG_RE = /"@@baffle-bigint@@(-?[0-9]+)"/g;

/** Serialise like JSON.stringify, writing bigints as JSON integers. */
export function stringifyJson(v: unknown): string {
  return JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? `${BIG}${x}` : x))
    .replace(BIG_RE, "$1");
}

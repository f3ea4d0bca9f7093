// JSON for kiln projections: a small parser for event data and view documents,
// and a writer whose output is byte for byte what serde_json writes for the
// same values (compact, fields in the order written, serde_json's string
// escapes, integers in decimal, floats in the shortest form), so a document
// written from AssemblyScript equals the one the Rust SDK writes. One
// exception: a float that needs 16-17 significant digits may be read and
// written a few units in the last place away from serde_json's (the parser
// below is exact only on Clinger's fast path; AssemblyScript's dtoa is
// Grisu2); tests/tests/projections_as.rs measures it. Floats of up to 15
// significant digits and exponents within ±22 are exact.

import { fail } from "./failure";

export const enum JsonKind {
  Null = 0,
  Bool = 1,
  Number = 2,
  String = 3,
  Array = 4,
  Object = 5,
}

/** A parsed JSON value. Numbers keep their exact integer value when they have one. */
export class JsonValue {
  kind: JsonKind = JsonKind.Null;
  bool: bool = false;
  /** The number as f64 (always set for numbers). */
  num: f64 = 0;
  /** Set when the number is an integer that fits in u64 (`uint`) or i64 (`int`). */
  isUint: bool = false;
  isInt: bool = false;
  uint: u64 = 0;
  int: i64 = 0;
  str: string = "";
  items: JsonValue[] | null = null;
  obj: JsonObject | null = null;

  /** serde's name for what this value is, for error messages. */
  describe(): string {
    switch (this.kind) {
      case JsonKind.Null:
        return "null";
      case JsonKind.Bool:
        return this.bool ? "boolean `true`" : "boolean `false`";
      case JsonKind.Number:
        if (this.isUint) return "integer `" + this.uint.toString() + "`";
        if (this.isInt) return "integer `" + this.int.toString() + "`";
        return "floating point `" + this.num.toString() + "`";
      case JsonKind.String:
        return 'string "' + this.str + '"';
      case JsonKind.Array:
        return "sequence";
      default:
        return "map";
    }
  }
}

/**
 * A JSON object: its keys in document order and typed accessors. An accessor
 * whose field is missing or of another type reports the failure for the
 * current event (like serde's `missing field` / `invalid type`) and returns a
 * zero value; the batch stops when the handler returns.
 */
export class JsonObject {
  keys: string[] = [];
  values: JsonValue[] = [];
  /** What the object is (`event of type`, `document`) and its name, for decode errors. */
  what: string = "";
  name: string = "";

  /** `event of type "UserRenamed" does not decode: ` (built only for an error). */
  context(): string {
    return this.what.length == 0 ? "" : this.what + ' "' + this.name + '" does not decode: ';
  }

  /** The value at `key`, or null. */
  get(key: string): JsonValue | null {
    const keys = this.keys;
    for (let i = 0, n = keys.length; i < n; i++) {
      if (unchecked(keys[i]) == key) return unchecked(this.values[i]);
    }
    return null;
  }

  has(key: string): bool {
    return this.get(key) !== null;
  }

  /** True when `key` is absent or null (serde's `Option` is `None`). */
  isNull(key: string): bool {
    const v = this.get(key);
    return v === null || v.kind == JsonKind.Null;
  }

  private need(key: string): JsonValue | null {
    const v = this.get(key);
    if (v === null) fail(this.context() + "missing field `" + key + "`");
    return v;
  }

  private invalid(v: JsonValue, key: string, expected: string): void {
    fail(this.context() + "invalid type: " + v.describe() + ", expected " + expected + " (field `" + key + "`)");
  }

  /** The value at `key` when it is of `kind`; else reports and returns null. */
  private typed(key: string, kind: JsonKind, expected: string): JsonValue | null {
    const v = this.need(key);
    if (v === null) return null;
    if (v.kind != kind) {
      this.invalid(v, key, expected);
      return null;
    }
    return v;
  }

  string(key: string): string {
    const v = this.typed(key, JsonKind.String, "a string");
    return v === null ? "" : v.str;
  }

  bool(key: string): bool {
    const v = this.typed(key, JsonKind.Bool, "a boolean");
    return v !== null && v.bool;
  }

  /** The integer at `key` when it fits `expected` (u64, u32 or i64); else reports and returns null. */
  private integer(key: string, expected: string, unsigned: bool, max: u64): JsonValue | null {
    const v = this.typed(key, JsonKind.Number, expected);
    if (v === null) return null;
    if (unsigned ? !v.isUint || v.uint > max : !v.isInt) {
      this.invalid(v, key, expected);
      return null;
    }
    return v;
  }

  u64(key: string): u64 {
    const v = this.integer(key, "u64", true, u64.MAX_VALUE);
    return v === null ? 0 : v.uint;
  }

  u32(key: string): u32 {
    const v = this.integer(key, "u32", true, <u64>u32.MAX_VALUE);
    return v === null ? 0 : <u32>v.uint;
  }

  i64(key: string): i64 {
    const v = this.integer(key, "i64", false, 0);
    return v === null ? 0 : v.int;
  }

  f64(key: string): f64 {
    const v = this.typed(key, JsonKind.Number, "f64");
    return v === null ? 0 : v.num;
  }

  /** The nested object at `key` (its errors carry this object's context). */
  object(key: string): JsonObject {
    const v = this.need(key);
    if (v === null) return new JsonObject();
    const o = v.obj;
    if (v.kind != JsonKind.Object || o === null) {
      this.invalid(v, key, "a map");
      return new JsonObject();
    }
    o.what = this.what;
    o.name = this.name;
    return o;
  }

  /** The array at `key`. */
  array(key: string): JsonValue[] {
    const v = this.need(key);
    if (v === null) return [];
    const items = v.items;
    if (v.kind != JsonKind.Array || items === null) {
      this.invalid(v, key, "a sequence");
      return [];
    }
    return items;
  }
}

// ---------------------------------------------------------------- parsing

/**
 * Parses the UTF-8 JSON at `ptr..ptr+len`; null (after reporting) when
 * malformed. `what` and `name` say what it is in error messages.
 */
export function parseJson(ptr: usize, len: usize, what: string = "", name: string = ""): JsonValue | null {
  const p = new Parser(ptr, ptr + len, what, name);
  const v = p.value(0);
  if (v === null) return null;
  p.ws();
  if (p.pos != p.end) {
    p.error("trailing characters");
    return null;
  }
  return v;
}

/** Parses a JSON object; reports and returns null when it is something else. */
export function parseObject(ptr: usize, len: usize, what: string = "", name: string = ""): JsonObject | null {
  const v = parseJson(ptr, len, what, name);
  if (v === null) return null;
  const o = v.obj;
  if (v.kind != JsonKind.Object || o === null) {
    const c = new JsonObject();
    c.what = what;
    c.name = name;
    fail(c.context() + "invalid type: " + v.describe() + ", expected a map");
    return null;
  }
  o.what = what;
  o.name = name;
  return o;
}

class Parser {
  constructor(public pos: usize, public end: usize, public what: string, public name: string) {}

  error(problem: string): void {
    const c = new JsonObject();
    c.what = this.what;
    c.name = this.name;
    fail(c.context() + "malformed JSON: " + problem);
    this.pos = this.end;
  }

  ws(): void {
    let p = this.pos;
    const end = this.end;
    while (p < end) {
      const c = load<u8>(p);
      if (c != 0x20 && c != 0x0a && c != 0x0d && c != 0x09) break;
      p++;
    }
    this.pos = p;
  }

  value(depth: i32): JsonValue | null {
    if (depth > 128) {
      this.error("nested too deep");
      return null;
    }
    this.ws();
    if (this.pos >= this.end) {
      this.error("unexpected end");
      return null;
    }
    const c = load<u8>(this.pos);
    const v = new JsonValue();
    if (c == 0x7b /* { */) {
      this.pos++;
      const o = new JsonObject();
      v.kind = JsonKind.Object;
      v.obj = o;
      this.ws();
      if (this.pos < this.end && load<u8>(this.pos) == 0x7d) {
        this.pos++;
        return v;
      }
      while (true) {
        this.ws();
        if (this.pos >= this.end || load<u8>(this.pos) != 0x22) {
          this.error("expected a key");
          return null;
        }
        this.pos++;
        const k = this.string();
        if (k === null) return null;
        this.ws();
        if (this.pos >= this.end || load<u8>(this.pos) != 0x3a) {
          this.error("expected ':'");
          return null;
        }
        this.pos++;
        const item = this.value(depth + 1);
        if (item === null) return null;
        o.keys.push(k);
        o.values.push(item);
        this.ws();
        if (this.pos >= this.end) {
          this.error("unexpected end");
          return null;
        }
        const d = load<u8>(this.pos++);
        if (d == 0x7d) return v;
        if (d != 0x2c) {
          this.error("expected ',' or '}'");
          return null;
        }
      }
    }
    if (c == 0x5b /* [ */) {
      this.pos++;
      const items = new Array<JsonValue>();
      v.kind = JsonKind.Array;
      v.items = items;
      this.ws();
      if (this.pos < this.end && load<u8>(this.pos) == 0x5d) {
        this.pos++;
        return v;
      }
      while (true) {
        const item = this.value(depth + 1);
        if (item === null) return null;
        items.push(item);
        this.ws();
        if (this.pos >= this.end) {
          this.error("unexpected end");
          return null;
        }
        const d = load<u8>(this.pos++);
        if (d == 0x5d) return v;
        if (d != 0x2c) {
          this.error("expected ',' or ']'");
          return null;
        }
      }
    }
    if (c == 0x22 /* " */) {
      this.pos++;
      const s = this.string();
      if (s === null) return null;
      v.kind = JsonKind.String;
      v.str = s;
      return v;
    }
    if (c == 0x74 && this.word("true")) {
      v.kind = JsonKind.Bool;
      v.bool = true;
      return v;
    }
    if (c == 0x66 && this.word("false")) {
      v.kind = JsonKind.Bool;
      return v;
    }
    if (c == 0x6e && this.word("null")) {
      return v;
    }
    if (c == 0x2d || (c >= 0x30 && c <= 0x39)) {
      return this.number(v);
    }
    this.error("unexpected character");
    return null;
  }

  word(w: string): bool {
    const n = <usize>w.length;
    if (this.pos + n > this.end) return false;
    for (let i: usize = 0; i < n; i++) {
      if (<u32>load<u8>(this.pos + i) != <u32>w.charCodeAt(<i32>i)) return false;
    }
    this.pos += n;
    return true;
  }

  number(v: JsonValue): JsonValue | null {
    const start = this.pos;
    let p = start;
    const end = this.end;
    const negative = load<u8>(p) == 0x2d;
    if (negative) p++;
    let mag: u64 = 0;
    let overflow = false;
    const digits = p;
    while (p < end) {
      const c = load<u8>(p);
      if (c < 0x30 || c > 0x39) break;
      const d = <u64>(c - 0x30);
      if (mag > (u64.MAX_VALUE - d) / 10) overflow = true;
      mag = mag * 10 + d;
      p++;
    }
    if (p == digits) {
      this.error("invalid number");
      return null;
    }
    let integral = true;
    if (p < end && load<u8>(p) == 0x2e) {
      integral = false;
      p++;
      while (p < end && load<u8>(p) >= 0x30 && load<u8>(p) <= 0x39) p++;
    }
    if (p < end && (load<u8>(p) == 0x65 || load<u8>(p) == 0x45)) {
      integral = false;
      p++;
      if (p < end && (load<u8>(p) == 0x2b || load<u8>(p) == 0x2d)) p++;
      while (p < end && load<u8>(p) >= 0x30 && load<u8>(p) <= 0x39) p++;
    }
    this.pos = p;
    v.kind = JsonKind.Number;
    if (integral && !overflow) {
      if (negative) {
        if (mag <= <u64>i64.MAX_VALUE + 1) {
          v.isInt = true;
          v.int = <i64>(0 - mag);
        }
        v.num = -(<f64>mag);
      } else {
        v.isUint = true;
        v.uint = mag;
        if (mag <= <u64>i64.MAX_VALUE) {
          v.isInt = true;
          v.int = <i64>mag;
        }
        v.num = <f64>mag;
      }
    } else {
      v.num = decimalToF64(start, p);
    }
    return v;
  }

  /** The rest of a string whose opening quote was consumed. */
  string(): string | null {
    const start = this.pos;
    let p = start;
    const end = this.end;
    let escaped = false;
    while (p < end) {
      const c = load<u8>(p);
      if (c == 0x22) break;
      if (c == 0x5c) {
        escaped = true;
        p += 2;
        continue;
      }
      if (c < 0x20) {
        this.error("control character in a string");
        return null;
      }
      p++;
    }
    if (p >= end) {
      this.error("unterminated string");
      return null;
    }
    this.pos = p + 1;
    if (!escaped) return String.UTF8.decodeUnsafe(start, p - start);
    return this.unescape(start, p);
  }

  unescape(start: usize, stop: usize): string | null {
    const out = new Bytes();
    let p = start;
    while (p < stop) {
      const c = load<u8>(p++);
      if (c != 0x5c) {
        out.byte(c);
        continue;
      }
      const e = load<u8>(p++);
      if (e == 0x22 || e == 0x5c || e == 0x2f) out.byte(e);
      else if (e == 0x62) out.byte(0x08);
      else if (e == 0x66) out.byte(0x0c);
      else if (e == 0x6e) out.byte(0x0a);
      else if (e == 0x72) out.byte(0x0d);
      else if (e == 0x74) out.byte(0x09);
      else if (e == 0x75) {
        let cp = this.hex4(p, stop);
        if (cp < 0) return null;
        p += 4;
        if (cp >= 0xd800 && cp < 0xdc00) {
          // A leading surrogate must be followed by \u and a trailing one.
          const lo = p + 6 <= stop && load<u8>(p) == 0x5c && load<u8>(p + 1) == 0x75 ? this.hex4(p + 2, stop) : -1;
          if (lo < 0xdc00 || lo >= 0xe000) {
            this.error("lone leading surrogate in hex escape");
            return null;
          }
          p += 6;
          cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        } else if (cp >= 0xdc00 && cp < 0xe000) {
          this.error("lone trailing surrogate in hex escape");
          return null;
        }
        out.codePoint(<u32>cp);
      } else {
        this.error("invalid escape");
        return null;
      }
    }
    return String.UTF8.decodeUnsafe(out.ptr, out.len);
  }

  hex4(p: usize, stop: usize): i32 {
    if (p + 4 > stop) {
      this.error("invalid escape");
      return -1;
    }
    let v: i32 = 0;
    for (let i: usize = 0; i < 4; i++) {
      const c = <i32>load<u8>(p + i);
      let d: i32;
      if (c >= 0x30 && c <= 0x39) d = c - 0x30;
      else if (c >= 0x61 && c <= 0x66) d = c - 0x61 + 10;
      else if (c >= 0x41 && c <= 0x46) d = c - 0x41 + 10;
      else {
        this.error("invalid escape");
        return -1;
      }
      v = (v << 4) | d;
    }
    return v;
  }
}

// Powers of ten exactly representable as f64.
const POW10: StaticArray<f64> = [
  1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
  1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/**
 * The JSON number at `start..end` as f64 (AssemblyScript's parseFloat is off
 * by powers of ten for some 17-digit inputs). Exact when the significand has
 * at most 15 digits and the decimal exponent is within ±22 (Clinger's fast
 * path: numbers as people write them); otherwise within a few units in the
 * last place.
 */
function decimalToF64(start: usize, end: usize): f64 {
  let p = start;
  const negative = load<u8>(p) == 0x2d;
  if (negative) p++;
  let sig: u64 = 0;
  let digits = 0;
  let exp10: i32 = 0;
  let fraction = false;
  for (; p < end; p++) {
    const c = load<u8>(p);
    if (c == 0x2e) {
      fraction = true;
      continue;
    }
    if (c < 0x30 || c > 0x39) break;
    if (digits < 19) {
      if (sig != 0 || c != 0x30) digits++;
      sig = sig * 10 + <u64>(c - 0x30);
      if (fraction) exp10--;
    } else if (!fraction) {
      exp10++;
    }
  }
  if (p < end && (load<u8>(p) == 0x65 || load<u8>(p) == 0x45)) {
    p++;
    let expNegative = false;
    if (p < end && (load<u8>(p) == 0x2b || load<u8>(p) == 0x2d)) expNegative = load<u8>(p++) == 0x2d;
    let e: i32 = 0;
    for (; p < end; p++) {
      const c = load<u8>(p);
      if (c < 0x30 || c > 0x39) break;
      if (e < 100000) e = e * 10 + <i32>(c - 0x30);
    }
    exp10 += expNegative ? -e : e;
  }
  let r = <f64>sig;
  if (sig == 0) return negative ? -0.0 : 0.0;
  if (exp10 >= 0 && exp10 <= 22) {
    r *= unchecked(POW10[exp10]);
  } else if (exp10 < 0 && exp10 >= -22) {
    r /= unchecked(POW10[-exp10]);
  } else if (exp10 > 0) {
    r *= Math.pow(10, <f64>min(exp10, 400));
  } else {
    // Two steps below 1e-308, so the divisor stays finite.
    if (exp10 < -308) {
      r /= 1e308;
      exp10 += 308;
    }
    r /= Math.pow(10, <f64>min(-exp10, 400));
  }
  return negative ? -r : r;
}

// ---------------------------------------------------------------- bytes

/** A growable byte buffer in linear memory. */
export class Bytes {
  ptr: usize = 0;
  len: usize = 0;
  cap: usize = 0;

  reserve(extra: usize): void {
    const need = this.len + extra;
    if (need <= this.cap) return;
    let cap = this.cap < 64 ? <usize>64 : this.cap << 1;
    while (cap < need) cap <<= 1;
    this.ptr = this.ptr == 0 ? heap.alloc(cap) : heap.realloc(this.ptr, cap);
    this.cap = cap;
  }

  @inline byte(b: u32): void {
    this.reserve(1);
    store<u8>(this.ptr + this.len, <u8>b);
    this.len++;
  }

  codePoint(cp: u32): void {
    this.reserve(4);
    const p = this.ptr + this.len;
    if (cp < 0x80) {
      store<u8>(p, <u8>cp);
      this.len += 1;
    } else if (cp < 0x800) {
      store<u8>(p, <u8>(0xc0 | (cp >> 6)));
      store<u8>(p + 1, <u8>(0x80 | (cp & 0x3f)));
      this.len += 2;
    } else if (cp < 0x10000) {
      store<u8>(p, <u8>(0xe0 | (cp >> 12)));
      store<u8>(p + 1, <u8>(0x80 | ((cp >> 6) & 0x3f)));
      store<u8>(p + 2, <u8>(0x80 | (cp & 0x3f)));
      this.len += 3;
    } else {
      store<u8>(p, <u8>(0xf0 | (cp >> 18)));
      store<u8>(p + 1, <u8>(0x80 | ((cp >> 12) & 0x3f)));
      store<u8>(p + 2, <u8>(0x80 | ((cp >> 6) & 0x3f)));
      store<u8>(p + 3, <u8>(0x80 | (cp & 0x3f)));
      this.len += 4;
    }
  }

  /** Appends the ASCII string `s` (no checks). */
  ascii(s: string): void {
    const n = <usize>s.length;
    this.reserve(n);
    for (let i: usize = 0; i < n; i++) store<u8>(this.ptr + this.len + i, <u8>s.charCodeAt(<i32>i));
    this.len += n;
  }
}

/** `s` as UTF-8 (a lone surrogate becomes U+FFFD). */
export function utf8(s: string, out: Bytes): void {
  const n = s.length;
  for (let i = 0; i < n; i++) {
    let c = <u32>s.charCodeAt(i);
    if (c >= 0xd800 && c < 0xe000) {
      const next = i + 1 < n ? <u32>s.charCodeAt(i + 1) : 0;
      if (c < 0xdc00 && next >= 0xdc00 && next < 0xe000) {
        c = 0x10000 + ((c - 0xd800) << 10) + (next - 0xdc00);
        i++;
      } else {
        c = 0xfffd;
      }
    }
    out.codePoint(c);
  }
}

// ---------------------------------------------------------------- writing

const HEX = "0123456789abcdef";

/**
 * Writes compact JSON exactly as serde_json does: call `key` before each
 * value of an object, in the order the Rust struct declares its fields.
 *
 *     w.beginObject().key("name").string(p.name).key("logins").u64(p.logins).endObject();
 */
export class JsonWriter {
  out: Bytes = new Bytes();
  private comma: bool = false;

  reset(): void {
    this.out.len = 0;
    this.comma = false;
  }

  @inline private sep(): void {
    if (this.comma) this.out.byte(0x2c);
  }

  beginObject(): JsonWriter {
    this.sep();
    this.out.byte(0x7b);
    this.comma = false;
    return this;
  }

  endObject(): JsonWriter {
    this.out.byte(0x7d);
    this.comma = true;
    return this;
  }

  beginArray(): JsonWriter {
    this.sep();
    this.out.byte(0x5b);
    this.comma = false;
    return this;
  }

  endArray(): JsonWriter {
    this.out.byte(0x5d);
    this.comma = true;
    return this;
  }

  key(k: string): JsonWriter {
    this.sep();
    this.quoted(k);
    this.out.byte(0x3a);
    this.comma = false;
    return this;
  }

  string(s: string): JsonWriter {
    this.sep();
    this.quoted(s);
    this.comma = true;
    return this;
  }

  bool(b: bool): JsonWriter {
    this.sep();
    this.out.ascii(b ? "true" : "false");
    this.comma = true;
    return this;
  }

  null(): JsonWriter {
    this.sep();
    this.out.ascii("null");
    this.comma = true;
    return this;
  }

  u64(v: u64): JsonWriter {
    this.sep();
    this.digits(v);
    this.comma = true;
    return this;
  }

  u32(v: u32): JsonWriter {
    return this.u64(<u64>v);
  }

  i64(v: i64): JsonWriter {
    this.sep();
    if (v < 0) {
      this.out.byte(0x2d);
      this.digits(<u64>0 - <u64>v);
    } else {
      this.digits(<u64>v);
    }
    this.comma = true;
    return this;
  }

  /** A u64 or `null` (a Rust `Option<u64>`). */
  u64OrNull(present: bool, v: u64): JsonWriter {
    return present ? this.u64(v) : this.null();
  }

  /** An f64 as serde_json writes it (NaN and infinities as null; see the file's note on 17-digit floats). */
  f64(v: f64): JsonWriter {
    if (!isFinite(v)) return this.null();
    this.sep();
    writeFloat(this.out, v);
    this.comma = true;
    return this;
  }

  /** Already-encoded JSON, as is. */
  raw(json: string): JsonWriter {
    this.sep();
    utf8(json, this.out);
    this.comma = true;
    return this;
  }

  private digits(v: u64): void {
    const out = this.out;
    out.reserve(20);
    let n: usize = 1;
    let t = v;
    while (t >= 10) {
      t /= 10;
      n++;
    }
    const p = out.ptr + out.len;
    let i = n;
    do {
      i--;
      store<u8>(p + i, <u8>(0x30 + <u32>(v % 10)));
      v /= 10;
    } while (v != 0);
    out.len += n;
  }

  private quoted(s: string): void {
    const out = this.out;
    out.byte(0x22);
    const n = s.length;
    for (let i = 0; i < n; i++) {
      let c = <u32>s.charCodeAt(i);
      if (c >= 0x20 && c < 0x80) {
        if (c == 0x22 || c == 0x5c) out.byte(0x5c);
        out.byte(c);
        continue;
      }
      if (c < 0x20) {
        out.byte(0x5c);
        if (c == 0x08) out.byte(0x62);
        else if (c == 0x0c) out.byte(0x66);
        else if (c == 0x0a) out.byte(0x6e);
        else if (c == 0x0d) out.byte(0x72);
        else if (c == 0x09) out.byte(0x74);
        else {
          out.ascii("u00");
          out.byte(<u32>HEX.charCodeAt(<i32>(c >> 4)));
          out.byte(<u32>HEX.charCodeAt(<i32>(c & 0xf)));
        }
        continue;
      }
      if (c >= 0xd800 && c < 0xe000) {
        const next = i + 1 < n ? <u32>s.charCodeAt(i + 1) : 0;
        if (c < 0xdc00 && next >= 0xdc00 && next < 0xe000) {
          c = 0x10000 + ((c - 0xd800) << 10) + (next - 0xdc00);
          i++;
        } else {
          c = 0xfffd;
        }
      }
      out.codePoint(c);
    }
    out.byte(0x22);
  }
}

/**
 * Writes a finite f64 the way serde_json (1.0.154, through zmij; ryu's
 * layout) does, from the shortest round-tripping digits: `1.0`, `0.001`,
 * `1e+16`, `1.5e-7`: plain from 1e-5 up to below 1e16, else scientific.
 */
function writeFloat(out: Bytes, v: f64): void {
  if (v == 0) {
    out.ascii(1 / v < 0 ? "-0.0" : "0.0");
    return;
  }
  if (v < 0) {
    out.byte(0x2d);
    v = -v;
  }
  // AssemblyScript's dtoa gives the shortest digits; read them and the
  // decimal exponent back out of its text.
  const text = v.toString();
  const digits = new Bytes();
  let point: i32 = -1;
  let exp: i32 = 0;
  const n = text.length;
  let i = 0;
  for (; i < n; i++) {
    const c = text.charCodeAt(i);
    if (c == 0x2e) point = <i32>digits.len;
    else if (c == 0x65) break;
    else digits.byte(<u32>c);
  }
  if (i < n) {
    let e = text.substring(i + 1);
    if (e.startsWith("+")) e = e.substring(1);
    exp = I32.parseInt(e);
  }
  if (point < 0) point = <i32>digits.len;
  // value = 0.d1d2d3... × 10^(point + exp); strip leading and trailing zeros.
  let first = 0;
  let last = <i32>digits.len;
  while (first < last && load<u8>(digits.ptr + first) == 0x30) {
    first++;
    point--;
  }
  while (last > first && load<u8>(digits.ptr + last - 1) == 0x30) last--;
  let length = last - first;
  let kk = point + exp; // 10^(kk-1) <= v < 10^kk
  let dptr = digits.ptr + first;
  // AssemblyScript's dtoa (Grisu2) can give 17 digits where fewer read back
  // as the same f64 (7e22 as 7.0000000000000008e+22): try the roundings to
  // 1, 2, ... digits and keep the first that parses back to `v`.
  if (length > 15) {
    const shorter = new Bytes();
    shorter.reserve(<usize>length);
    for (let p = 1; p < length; p++) {
      memory.copy(shorter.ptr, dptr, <usize>p);
      let pk = kk;
      if (load<u8>(dptr + p) >= 0x35) {
        let j = p - 1;
        while (j >= 0 && load<u8>(shorter.ptr + j) == 0x39) {
          store<u8>(shorter.ptr + j, 0x30);
          j--;
        }
        if (j < 0) {
          store<u8>(shorter.ptr, 0x31);
          pk++;
        } else {
          store<u8>(shorter.ptr + j, load<u8>(shorter.ptr + j) + 1);
        }
      }
      const candidate = "0." + String.UTF8.decodeUnsafe(shorter.ptr, <usize>p) + "e" + pk.toString();
      if (parseFloat(candidate) == v) {
        let n = p;
        while (n > 1 && load<u8>(shorter.ptr + n - 1) == 0x30) n--;
        dptr = shorter.ptr;
        length = n;
        kk = pk;
        break;
      }
    }
  }
  first = 0;
  const k = kk - length; // v = digits × 10^k
  const d = (j: i32, ptr: usize, start: i32): u32 => <u32>load<u8>(ptr + start + j);
  if (k >= 0 && kk <= 16) {
    for (let j = 0; j < length; j++) out.byte(d(j, dptr, first));
    for (let j = 0; j < k; j++) out.byte(0x30);
    out.ascii(".0");
  } else if (kk > 0 && kk <= 16) {
    for (let j = 0; j < length; j++) {
      if (j == kk) out.byte(0x2e);
      out.byte(d(j, dptr, first));
    }
  } else if (kk > -5 && kk <= 0) {
    out.ascii("0.");
    for (let j = 0; j < -kk; j++) out.byte(0x30);
    for (let j = 0; j < length; j++) out.byte(d(j, dptr, first));
  } else {
    out.byte(d(0, dptr, first));
    if (length > 1) {
      out.byte(0x2e);
      for (let j = 1; j < length; j++) out.byte(d(j, dptr, first));
    }
    // serde_json 1.0.154's formatter (zmij) always signs the exponent: 1e+16, 1.5e-7.
    out.byte(0x65);
    out.byte(kk - 1 < 0 ? 0x2d : 0x2b);
    out.ascii(abs(kk - 1).toString());
  }
}

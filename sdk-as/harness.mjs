// The test harness of kiln-sdk-as: runs a built projection module in Node
// (V8, native speed) the way the daemon does (sdk/ABI.md): the manifest's
// filter, every batch in a fresh instance, reads that see the batch's own
// writes, nothing of a failed batch kept, failures and panics with the event's
// position. Documents live in a map.
//
//   import { Harness } from "kiln-sdk-as/harness";
//   const h = await Harness.load("build/users.wasm");
//   h.event("user-1", "UserRegistered", { name: "Ada", email: "a@x" });
//   assert.equal(h.doc("user-1").name, "Ada");

import { readFileSync } from "node:fs";

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

/** Why the harness could not apply an event: `kind` is failed, panic or trap. */
export class HarnessError extends Error {
  constructor(kind, position, message) {
    super(`${kind} at event position ${position}: ${message}`);
    this.kind = kind;
    this.position = position;
    this.detail = message;
  }
}

function checkKey(bytes) {
  if (bytes.length === 0 || bytes.length > 1024) throw new Error(`key of ${bytes.length} bytes (1 to 1024)`);
  const key = dec.decode(bytes);
  if (/[\u0000-\u001f\u007f]/.test(key)) throw new Error(`key ${JSON.stringify(key)} holds a control character`);
  return key;
}

export class Harness {
  /** Loads a module file. */
  static async load(path) {
    return new Harness(await WebAssembly.compile(readFileSync(path)));
  }

  constructor(module) {
    this.module = module;
    const sections = WebAssembly.Module.customSections(module, "kiln-manifest");
    if (sections.length !== 1) throw new Error("the module has no kiln-manifest section");
    this.manifest = JSON.parse(dec.decode(sections[0]));
    /** Committed documents: key → JSON text. */
    this.docs = new Map();
    this.position = 0;
    this.versions = new Map();
  }

  /** Whether the manifest asks for this event (as the host filters). */
  wants(stream, type) {
    const category = stream.split("-")[0];
    const { events = [], categories = [] } = this.manifest;
    return (events.length === 0 || events.includes(type)) && (categories.length === 0 || categories.includes(category));
  }

  /**
   * Appends one event (next position, next version of its stream, timestamp =
   * position unless given) and applies it as a batch of its own.
   */
  event(stream, type, data = {}, { metadata = {}, timestamp } = {}) {
    return this.batch([{ stream, type, data, metadata, timestamp }]);
  }

  /** Appends events and applies them as one batch. */
  batch(events) {
    const recorded = events.map((e) => {
      const position = ++this.position;
      const version = (this.versions.get(e.stream) ?? 0) + 1;
      this.versions.set(e.stream, version);
      return { ...e, position, version, timestamp: e.timestamp ?? position, metadata: e.metadata ?? {} };
    });
    this.apply(recorded.filter((e) => this.wants(e.stream, e.type)));
    return this;
  }

  /** The document at `key`, parsed (undefined if none). */
  doc(key) {
    const raw = this.docs.get(key);
    return raw === undefined ? undefined : JSON.parse(raw);
  }

  /** The document at `key` as its exact JSON text. */
  raw(key) {
    return this.docs.get(key);
  }

  /** Every document in key order: [key, parsed document] pairs. */
  documents() {
    return [...this.docs.keys()].sort(compareBytes).map((k) => [k, JSON.parse(this.docs.get(k))]);
  }

  apply(events) {
    if (events.length === 0) return;
    const batch = encodeBatch(events);
    const overlay = new Map(); // key → JSON text, or null for a delete
    const state = { failure: null, panic: null, fault: null };
    let memory;
    const bytes = (ptr, len) => {
      const end = (ptr >>> 0) + (len >>> 0);
      if (end > memory.buffer.byteLength) throw new Error(`region ${ptr >>> 0}+${len >>> 0} is outside the guest's memory`);
      return new Uint8Array(memory.buffer, ptr >>> 0, len >>> 0);
    };
    const read = (key) => (overlay.has(key) ? overlay.get(key) : this.docs.get(key) ?? null);
    const guard = (f) => (...args) => {
      try {
        return f(...args);
      } catch (e) {
        state.fault ??= e.message;
        throw e;
      }
    };
    const copyOut = (data, out, cap) => {
      if (data.length <= cap >>> 0) bytes(out, data.length).set(data);
      return BigInt(data.length);
    };
    const kiln = {
      get: guard((kp, kl, out, cap) => {
        const doc = read(checkKey(bytes(kp, kl)));
        return doc === null ? -1n : copyOut(enc.encode(doc), out, cap);
      }),
      put: guard((kp, kl, dp, dl) => {
        const key = checkKey(bytes(kp, kl));
        const text = dec.decode(bytes(dp, dl));
        JSON.parse(text);
        overlay.set(key, text);
      }),
      delete: guard((kp, kl) => {
        overlay.set(checkKey(bytes(kp, kl)), null);
      }),
      scan: guard((pp, pl, out, cap) => {
        const prefix = dec.decode(bytes(pp, pl));
        const keys = new Set([...this.docs.keys(), ...overlay.keys()]);
        const hits = [...keys].filter((k) => k.startsWith(prefix) && read(k) !== null).sort(compareBytes);
        const parts = [u32(hits.length)];
        for (const k of hits) {
          const kb = enc.encode(k);
          const db = enc.encode(read(k));
          parts.push(u32(kb.length), kb, u32(db.length), db);
        }
        return copyOut(concat(parts), out, cap);
      }),
      fail: (index, mp, ml) => {
        state.failure = { index, message: dec.decode(bytes(mp, Math.min(ml, 4096))) };
      },
      panic: (index, mp, ml) => {
        state.panic = { index, message: dec.decode(bytes(mp, Math.min(ml, 4096))) };
      },
    };
    const position = (index) => events[index]?.position ?? events[0].position;
    let result;
    try {
      const instance = new WebAssembly.Instance(this.module, { kiln });
      memory = instance.exports.memory;
      const ptr = instance.exports.kiln_alloc(batch.length);
      bytes(ptr, batch.length).set(batch);
      result = instance.exports.kiln_apply(ptr, batch.length);
    } catch (e) {
      if (state.panic) throw new HarnessError("panic", position(state.panic.index), state.panic.message);
      throw new HarnessError("trap", events[0].position, state.fault ?? e.message);
    }
    if (result === 1) {
      if (!state.failure) throw new HarnessError("trap", events[0].position, "kiln_apply returned 1 without calling kiln.fail");
      throw new HarnessError("failed", position(state.failure.index), state.failure.message);
    }
    if (result !== 0) throw new HarnessError("trap", events[0].position, `kiln_apply returned ${result}`);
    for (const [k, v] of overlay) {
      if (v === null) this.docs.delete(k);
      else this.docs.set(k, v);
    }
  }
}

function compareBytes(a, b) {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

function u32(n) {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n, true);
  return b;
}

function u64(n) {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n), true);
  return b;
}

function str(s) {
  const b = enc.encode(s);
  return [u32(b.length), b];
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The ABI's batch encoding (sdk/ABI.md, "Batch encoding"). */
export function encodeBatch(events) {
  const parts = [u32(events.length)];
  for (const e of events) {
    const data = enc.encode(typeof e.data === "string" ? e.data : JSON.stringify(e.data));
    const meta = Object.entries(e.metadata ?? {});
    parts.push(u64(e.position), u64(e.version), u64(e.timestamp), ...str(e.stream), ...str(e.type), u32(data.length), data, u32(meta.length));
    for (const [k, v] of meta) parts.push(...str(k), ...str(String(v)));
  }
  return concat(parts);
}

// A projection's handle on its view: JSON documents by key, read and written
// through kiln's host functions (`kiln.get`, `put`, `delete`, `scan`). Reads
// see the batch's own earlier writes. Once the current event has failed
// (`fail`, or a field that does not decode), the view does nothing more: reads
// find nothing and writes are dropped, so a handler that carries on with zero
// values cannot reach the host with them (the batch commits nothing anyway).

import { Bytes, JsonObject, JsonWriter, parseObject, utf8 } from "./json";
import { fail, failed } from "./failure";

@external("kiln", "get")
declare function host_get(key: usize, keyLen: usize, out: usize, outCap: usize): i64;
@external("kiln", "put")
declare function host_put(key: usize, keyLen: usize, doc: usize, docLen: usize): void;
@external("kiln", "delete")
declare function host_delete(key: usize, keyLen: usize): void;
@external("kiln", "scan")
declare function host_scan(prefix: usize, prefixLen: usize, out: usize, outCap: usize): i64;

/** A view document: a class that reads itself from and writes itself as JSON. */
export abstract class Document {
  /** Reads the fields from a stored document (keep the field names of `writeJson`). */
  abstract readJson(o: JsonObject): void;
  /** Writes the document: fields in the order the Rust struct (if any) declares them. */
  abstract writeJson(w: JsonWriter): void;
}

/** One document of a scan. */
export class Entry<D> {
  constructor(public key: string, public doc: D) {}
}

export class View {
  private keyBuf: Bytes = new Bytes();
  private outPtr: usize = 0;
  private outCap: usize = 0;
  private writer: JsonWriter = new JsonWriter();

  private encodeKey(key: string): void {
    this.keyBuf.len = 0;
    utf8(key, this.keyBuf);
  }

  /** Calls a host function that copies its answer when it fits; grows and retries. Returns its length or -1. */
  private fetch(scan: bool): i64 {
    if (failed()) return -1;
    while (true) {
      const kb = this.keyBuf;
      const n = scan
        ? host_scan(kb.ptr, kb.len, this.outPtr, this.outCap)
        : host_get(kb.ptr, kb.len, this.outPtr, this.outCap);
      if (n < 0 || <u64>n <= <u64>this.outCap) return n;
      let cap = this.outCap < 1024 ? <usize>1024 : this.outCap;
      while (<u64>cap < <u64>n) cap <<= 1;
      this.outPtr = heap.alloc(cap);
      this.outCap = cap;
    }
  }

  /** The raw JSON at `key`, or null. */
  getJson(key: string): string | null {
    this.encodeKey(key);
    const n = this.fetch(false);
    if (n < 0) return null;
    return String.UTF8.decodeUnsafe(this.outPtr, <usize>n);
  }

  /** The document at `key` parsed as an object, or null (absent or not an object, reported). */
  getObject(key: string): JsonObject | null {
    this.encodeKey(key);
    const n = this.fetch(false);
    if (n < 0) return null;
    return parseObject(this.outPtr, <usize>n, "document", key);
  }

  /** The document at `key`, or null. */
  get<D extends Document>(key: string): D | null {
    const o = this.getObject(key);
    if (o === null) return null;
    const d = instantiate<D>();
    d.readJson(o);
    return d;
  }

  /** The document at `key`, or a new `D` (its field initialisers are the defaults). */
  getOrDefault<D extends Document>(key: string): D {
    const d = this.get<D>(key);
    return d !== null ? d : instantiate<D>();
  }

  /** Writes `doc` at `key`, replacing any previous document. */
  put<D extends Document>(key: string, doc: D): void {
    const w = this.writer;
    w.reset();
    doc.writeJson(w);
    this.putBytes(key, w.out.ptr, w.out.len);
  }

  /** Writes already-encoded JSON at `key`. */
  putJson(key: string, json: string): void {
    const b = new Bytes();
    utf8(json, b);
    this.putBytes(key, b.ptr, b.len);
  }

  private putBytes(key: string, ptr: usize, len: usize): void {
    if (failed()) return;
    this.encodeKey(key);
    host_put(this.keyBuf.ptr, this.keyBuf.len, ptr, len);
  }

  /** Reads the document at `key` (or the default), lets `f` change it, writes it back. */
  update<D extends Document>(key: string, f: (doc: D) => void): void {
    const d = this.getOrDefault<D>(key);
    f(d);
    this.put<D>(key, d);
  }

  delete(key: string): void {
    if (failed()) return;
    this.encodeKey(key);
    host_delete(this.keyBuf.ptr, this.keyBuf.len);
  }

  /** Every document whose key starts with `prefix`, in key order. */
  scan<D extends Document>(prefix: string): Entry<D>[] {
    this.encodeKey(prefix);
    const n = this.fetch(true);
    const entries = new Array<Entry<D>>();
    if (n < 0) return entries;
    let p = this.outPtr;
    const end = p + <usize>n;
    if (p + 4 > end) return entries;
    const count = load<u32>(p);
    p += 4;
    for (let i: u32 = 0; i < count; i++) {
      if (p + 4 > end) break;
      const kl = <usize>load<u32>(p);
      const key = String.UTF8.decodeUnsafe(p + 4, kl);
      p += 4 + kl;
      const dl = <usize>load<u32>(p);
      const o = parseObject(p + 4, dl, "document", key);
      p += 4 + dl;
      if (o === null) break;
      const d = instantiate<D>();
      d.readJson(o);
      entries.push(new Entry<D>(key, d));
    }
    // A document that does not parse has been reported; fail() keeps the first message.
    if (entries.length < <i32>count) fail("scan of " + prefix + " stopped early");
    return entries;
  }
}

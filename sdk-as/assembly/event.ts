// Events as the host delivers them (sdk/ABI.md, "Batch encoding"): the log's
// envelope, and the data as a JSON object decoded on first use.

import { JsonObject, parseObject } from "./json";

export class Event {
  /** Stream id, e.g. `user-42`. */
  stream: string = "";
  /** The event's type, e.g. `UserRegistered`. */
  type: string = "";
  /** Global position in the log. */
  position: u64 = 0;
  /** Version within its stream (1-based). */
  version: u64 = 0;
  /** Commit time, ms since the Unix epoch (from the log, so replays see the same value). */
  timestamp: u64 = 0;
  /** Metadata keys and values, in the log's order (null when none). */
  metadataKeys: string[] | null = null;
  metadataValues: string[] | null = null;
  dataPtr: usize = 0;
  dataLen: usize = 0;
  private parsed: JsonObject | null = null;

  /**
   * The event's data as a JSON object. A field read through it that is missing
   * or of another type fails the event (`event of type "X" does not decode:
   * missing field \`name\``), like serde in the Rust SDK.
   */
  get data(): JsonObject {
    let o = this.parsed;
    if (o === null) {
      o = parseObject(this.dataPtr, this.dataLen, "event of type", this.type);
      if (o === null) o = new JsonObject();
      this.parsed = o;
    }
    return o;
  }

  /** The event's data as a JSON string. */
  get json(): string {
    return String.UTF8.decodeUnsafe(this.dataPtr, this.dataLen);
  }

  /** The metadata value for `key`, or null. */
  metadata(key: string): string | null {
    const keys = this.metadataKeys;
    const values = this.metadataValues;
    if (keys === null || values === null) return null;
    for (let i = 0; i < keys.length; i++) if (keys[i] == key) return values[i];
    return null;
  }

  /** The stream's category: the part of its id before the first `-`. */
  get category(): string {
    const i = this.stream.indexOf("-");
    return i < 0 ? this.stream : this.stream.substring(0, i);
  }

  /** The stream id after the first `-` (`42` for `user-42`), or the whole id. */
  get streamKey(): string {
    const i = this.stream.indexOf("-");
    return i < 0 ? this.stream : this.stream.substring(i + 1);
  }
}

/** Reads the events of an encoded batch one by one. */
export class BatchReader {
  // Streams and types repeat from event to event: their strings are decoded
  // once and reused while the bytes are the same (the last stream; a few types).
  private streamPtr: usize = 0;
  private streamLen: usize = 0;
  private stream: string = "";
  private typePtrs: usize[] = [];
  private typeLens: usize[] = [];
  private types: string[] = [];

  constructor(private p: usize, private end: usize) {}

  private streamAt(ptr: usize, len: usize): string {
    if (len != this.streamLen || memory.compare(ptr, this.streamPtr, len) != 0) {
      this.stream = String.UTF8.decodeUnsafe(ptr, len);
      this.streamPtr = ptr;
      this.streamLen = len;
    }
    return this.stream;
  }

  private typeAt(ptr: usize, len: usize): string {
    const n = this.types.length;
    for (let i = 0; i < n; i++) {
      if (unchecked(this.typeLens[i]) == len && memory.compare(ptr, unchecked(this.typePtrs[i]), len) == 0) {
        return unchecked(this.types[i]);
      }
    }
    const t = String.UTF8.decodeUnsafe(ptr, len);
    if (n < 16) {
      this.typePtrs.push(ptr);
      this.typeLens.push(len);
      this.types.push(t);
    }
    return t;
  }

  private span(): usize {
    const n = <usize>load<u32>(this.p);
    this.p += 4 + n;
    return n;
  }

  count(): u32 {
    if (this.p + 4 > this.end) return 0;
    const n = load<u32>(this.p);
    this.p += 4;
    return n;
  }

  private str(): string {
    const n = <usize>load<u32>(this.p);
    const s = String.UTF8.decodeUnsafe(this.p + 4, n);
    this.p += 4 + n;
    return s;
  }

  /** The next event, or null when the batch is malformed past this point. */
  next(): Event | null {
    if (this.p + 24 > this.end) return null;
    const e = new Event();
    e.position = load<u64>(this.p);
    e.version = load<u64>(this.p, 8);
    e.timestamp = load<u64>(this.p, 16);
    this.p += 24;
    let len = this.span();
    e.stream = this.streamAt(this.p - len, len);
    len = this.span();
    e.type = this.typeAt(this.p - len, len);
    e.dataLen = <usize>load<u32>(this.p);
    e.dataPtr = this.p + 4;
    this.p += 4 + e.dataLen;
    const m = load<u32>(this.p);
    this.p += 4;
    if (m > 0) {
      const keys = new Array<string>();
      const values = new Array<string>();
      for (let i: u32 = 0; i < m; i++) {
        keys.push(this.str());
        values.push(this.str());
      }
      e.metadataKeys = keys;
      e.metadataValues = values;
    }
    if (this.p > this.end) return null;
    return e;
  }
}

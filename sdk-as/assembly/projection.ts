// The forms of a projection, as in the Rust SDK: `Projection` (events in,
// any document reads and writes out), `PerStream<S>` (one state document per
// stream, keyed by the stream id, `apply(state, event) -> state`) and
// `Keyed<S>` (the same under a key of your choosing), and the ABI exports that
// run the registered one over a batch.

import { BatchReader, Event } from "./event";
import { Document, View } from "./view";
import { currentIndex, fail, failed, setIndex, takeFailure } from "./failure";

@external("kiln", "fail")
declare function host_fail(index: u32, msg: usize, msgLen: usize): void;

/** A projection: events in, document reads and writes out; no state of its own between events. */
export abstract class Projection {
  /** Applies one event. Call `fail(message)` and return to fail it. */
  abstract handle(e: Event, view: View): void;

  /** Called once after the last event of every batch; a failure fails the batch. */
  finishBatch(view: View): void {}

  /** One event of a batch: `handle` here; `PerStream` keeps states for the batch instead. */
  step(e: Event, view: View): void {
    this.handle(e, view);
  }

  /** Applies a batch: `step` for each event, then `finishBatch`. Returns how many events it held. */
  applyBatch(batch: BatchReader, view: View): u32 {
    const n = batch.count();
    for (let i: u32 = 0; i < n; i++) {
      setIndex(i);
      const e = batch.next();
      if (e === null) {
        fail("malformed batch");
        return i;
      }
      this.step(e, view);
      if (failed()) return i;
    }
    if (n > 0) setIndex(n - 1);
    this.finishBatch(view);
    return n;
  }
}

/**
 * A state-per-key form's batch: within a batch each key's state is read and
 * decoded once and written once, at the end, in key order.
 */
abstract class Folded<S extends Document> extends Projection {
  /** The document's state after `e`. */
  abstract apply(state: S, e: Event): S;

  /** The key of the document `e` updates. */
  abstract keyOf(e: Event): string;

  /** One event on its own: read the state, apply, write it back. */
  handle(e: Event, view: View): void {
    const key = this.keyOf(e);
    view.put<S>(key, this.apply(view.getOrDefault<S>(key), e));
  }

  private memo: Map<string, S> = new Map<string, S>();

  /** Within a batch: the key's state from the batch's memo (or the view), applied, kept. */
  step(e: Event, view: View): void {
    const key = this.keyOf(e);
    const memo = this.memo;
    const state = memo.has(key) ? memo.get(key) : view.getOrDefault<S>(key);
    if (failed()) return;
    memo.set(key, this.apply(state, e));
  }

  /** Writes every state the batch touched, once, in key order. */
  finishBatch(view: View): void {
    const memo = this.memo;
    const keys = memo.keys();
    keys.sort();
    for (let i = 0; i < keys.length; i++) view.put<S>(keys[i], memo.get(keys[i]));
    memo.clear();
  }
}

/**
 * The per-stream form: one state document per stream, keyed by the stream id
 * and nothing else, so every document depends only on its own stream's events
 * (what `"per_stream": true` in package.json promises; the host checks it
 * while a warm-up is split). Documents that gather several streams use `Keyed`.
 */
export abstract class PerStream<S extends Document> extends Folded<S> {
  keyOf(e: Event): string {
    return e.stream;
  }
}

/**
 * The keyed form: one state document per `key(e)`, which may gather the
 * events of several streams. Leave `per_stream` out of package.json: such a
 * view warms with one worker, in log order.
 */
export abstract class Keyed<S extends Document> extends Folded<S> {
  /** The key of the document `e` updates. */
  abstract key(e: Event): string;

  keyOf(e: Event): string {
    return this.key(e);
  }
}

let registered: Projection | null = null;

/** Makes `p` the module's projection (call once, at the top level of the entry file). */
export function register(p: Projection): void {
  registered = p;
}

/** `kiln_alloc`: a buffer of `len` bytes for the batch (each batch runs in a fresh instance). */
export function kiln_alloc(len: i32): i32 {
  return <i32>heap.alloc(<usize>(len < 0 ? 0 : len));
}

/** `kiln_apply`: applies the batch at `ptr`; 0 on success, 1 after `kiln.fail`. */
export function kiln_apply(ptr: i32, len: i32): i32 {
  const p = registered;
  if (p === null) {
    reportFailure(0, "no projection registered: call register(new MyProjection()) in the entry file");
    return 1;
  }
  const start = <usize>ptr;
  p.applyBatch(new BatchReader(start, start + <usize>len), new View());
  const f = takeFailure();
  if (f === null) return 0;
  reportFailure(currentIndex, f);
  return 1;
}

function reportFailure(index: u32, message: string): void {
  const bytes = String.UTF8.encode(message);
  host_fail(index, changetype<usize>(bytes), <usize>bytes.byteLength);
}

// A projection's failure for the current event: the first message reported
// wins; the batch stops (and commits nothing) once the handler returns.
// Panics (`throw`, `assert`, `abort`, an index out of range) do not return:
// the SDK's abort handler reports them through `kiln.panic` and traps.

@external("kiln", "panic")
declare function host_panic(index: u32, msg: usize, msgLen: usize): void;

/** Index of the event being applied within its batch. */
export let currentIndex: u32 = 0;

let failure: string | null = null;

/**
 * Fails the current event with `message` (the host reports the projection,
 * version, the event's position and the message). Return from the handler
 * after calling it: the batch stops there.
 */
export function fail(message: string): void {
  if (failure === null) failure = message;
}

/** True when the current event has failed. */
export function failed(): bool {
  return failure !== null;
}

export function takeFailure(): string | null {
  const f = failure;
  failure = null;
  return f;
}

export function setIndex(index: u32): void {
  currentIndex = index;
}

/**
 * The module's `abort` (`--use abort=...`, set by `kiln-as build`): reports
 * the panic's message and place for the current event, then traps.
 */
export function kilnAbort(message: string | null, fileName: string | null, line: u32, column: u32): void {
  let text = message !== null ? message : "abort";
  if (fileName !== null) text += " (at " + fileName + ":" + line.toString() + ":" + column.toString() + ")";
  const bytes = String.UTF8.encode(text);
  host_panic(currentIndex, changetype<usize>(bytes), <usize>bytes.byteLength);
  unreachable();
}

// The SDK's own tests: the fixture projection (test/fixture.ts) through the
// harness. `npm test` builds it first.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Harness } from "../harness.mjs";

const load = () => Harness.load(new URL("../build/fixture.wasm", import.meta.url));

test("the manifest section holds the name and version given to kiln-as build", async () => {
  const h = await load();
  assert.deepEqual(h.manifest, { abi: 1, name: "fixture", version: "0.1.0", events: [], categories: [] });
});

test("documents are written as serde_json writes them", async () => {
  const h = await load();
  h.event("t-1", "Echo", { key: "a", s: 'q"\\/\n\t\u0001\u007f é 😀', f: 0.1, i: -42, u: 7, b: true });
  assert.equal(h.raw("a"), '{"s":"q\\"\\\\/\\n\\t\\u0001\u007f é 😀","f":0.1,"i":-42,"u":7,"b":true}');
});

test("a field of another type fails the event", async () => {
  const h = await load();
  assert.throws(
    () => h.event("t-1", "Echo", { key: "a", s: "x", f: 1, i: 1, u: "7", b: true }),
    (e) => e.kind === "failed" && e.detail.includes('invalid type: string "7", expected u64 (field `u`)'),
  );
  assert.equal(h.raw("a"), undefined);
});

test("typed reads, update, delete and scan see the batch's own writes", async () => {
  const h = await load();
  h.batch([
    { stream: "c-1", type: "Count", data: { key: "count/a" } },
    { stream: "c-1", type: "Count", data: { key: "count/a" } },
    { stream: "c-1", type: "Count", data: { key: "count/b" } },
    { stream: "c-1", type: "Count", data: { key: "other" } },
    { stream: "c-1", type: "Sum", data: { prefix: "count/", into: "total" } },
  ]);
  assert.equal(h.raw("total"), '{"n":3}');
  h.event("c-1", "Drop", { key: "count/a" }).event("c-1", "Sum", { prefix: "count/", into: "total" });
  assert.equal(h.raw("total"), '{"n":1}');
  assert.equal(h.doc("count/a"), undefined);
});

test("a failure names its event's position and keeps nothing of the batch", async () => {
  const h = await load();
  assert.throws(
    () =>
      h.batch([
        { stream: "c-1", type: "Count", data: { key: "n" } },
        { stream: "c-1", type: "Fail", data: { message: "no such order" } },
      ]),
    (e) => e.kind === "failed" && e.position === 2 && e.detail === "no such order",
  );
  assert.equal(h.doc("n"), undefined);
});

test("a panic names its event's position and its message", async () => {
  const h = await load();
  assert.throws(
    () =>
      h.batch([
        { stream: "c-1", type: "Count", data: { key: "n" } },
        { stream: "c-1", type: "Count", data: { key: "n" } },
        { stream: "c-1", type: "Panic", data: { message: "boom" } },
      ]),
    (e) => e.kind === "panic" && e.position === 3 && e.detail.startsWith("boom (at test/fixture.ts:"),
  );
});

test("a missing field fails the event with serde's words", async () => {
  const h = await load();
  assert.throws(
    () => h.event("c-1", "Count", { nope: 1 }),
    (e) => e.kind === "failed" && e.detail === 'event of type "Count" does not decode: missing field `key`',
  );
});

// Unit tests of the `users` projection, run in Node by the SDK's harness
// (`npm test` builds the module first). The same cases as the Rust crate's.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Harness } from "kiln-sdk-as/harness";

const load = () => Harness.load(new URL("../build/users.wasm", import.meta.url));

test("profile follows registration, rename, email and logins", async () => {
  const h = await load();
  h.event("user-1", "UserRegistered", { name: "Ada", email: "ada@x.io" })
    .event("user-1", "UserLoggedIn", {})
    .event("user-1", "LoginFailed", {})
    .event("user-1", "UserRenamed", { name: "Ada L." })
    .event("user-1", "EmailChanged", { email: "ada@l.io" })
    .event("user-1", "UserLoggedIn", {});
  assert.equal(
    h.raw("user-1"),
    '{"id":"1","name":"Ada L.","email":"ada@l.io","registered_at":1,"renames":1,"logins":2,"failed_logins":1,"last_login":6}',
  );
});

test("users are independent and other categories ignored", async () => {
  const h = await load();
  h.event("user-1", "UserRegistered", { name: "A", email: "a@x" })
    .event("user-2", "UserRegistered", { name: "B", email: "b@x" })
    .event("admin-1", "UserLoggedIn", {})
    .event("user-2", "SomethingElse", {});
  assert.equal(h.doc("user-2").name, "B");
  assert.equal(h.doc("user-1").logins, 0);
  assert.equal(h.doc("user-1").last_login, null);
  assert.deepEqual(h.documents().map(([k]) => k), ["user-1", "user-2"]);
});

test("malformed event data names the position", async () => {
  const h = await load();
  h.event("user-1", "UserRegistered", { name: "A", email: "a@x" });
  assert.throws(
    () => h.event("user-1", "UserRenamed", { nom: "x" }),
    (e) => e.kind === "failed" && e.position === 2 && e.detail.includes("missing field `name`"),
  );
  assert.equal(h.doc("user-1").name, "A", "the failed event changed nothing");
});

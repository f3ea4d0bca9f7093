// A projection exercising every part of the SDK, for the SDK's own tests
// (test/sdk.test.mjs) and the Rust end-to-end tests (tests/tests/projections_as.rs).
//
//   Echo  {key, s, f, i, u, b}  writes {"s":..,"f":..,"i":..,"u":..,"b":..} at key
//   Count {key}                 view.update: {"n": n + 1}
//   Drop  {key}                 view.delete
//   Sum   {prefix, into}        view.scan of Counts under prefix, total at into
//   Fail  {message}             fail(message)
//   Panic {message}             throw new Error(message)

import { Document, Event, JsonObject, JsonWriter, Projection, View, fail, register } from "kiln-sdk-as/assembly";
export { kiln_alloc, kiln_apply } from "kiln-sdk-as/assembly";

class Echo extends Document {
  s: string = "";
  f: f64 = 0;
  i: i64 = 0;
  u: u64 = 0;
  b: bool = false;

  readJson(o: JsonObject): void {
    this.s = o.string("s");
    this.f = o.f64("f");
    this.i = o.i64("i");
    this.u = o.u64("u");
    this.b = o.bool("b");
  }

  writeJson(w: JsonWriter): void {
    w.beginObject().key("s").string(this.s).key("f").f64(this.f).key("i").i64(this.i).key("u").u64(this.u).key("b").bool(this.b).endObject();
  }
}

class Counter extends Document {
  n: u64 = 0;
  readJson(o: JsonObject): void {
    this.n = o.u64("n");
  }
  writeJson(w: JsonWriter): void {
    w.beginObject().key("n").u64(this.n).endObject();
  }
}

class Fixture extends Projection {
  handle(e: Event, view: View): void {
    const d = e.data;
    if (e.type == "Echo") {
      const echo = new Echo();
      echo.readJson(d);
      view.put<Echo>(d.string("key"), echo);
    } else if (e.type == "Count") {
      view.update<Counter>(d.string("key"), (c: Counter): void => {
        c.n += 1;
      });
    } else if (e.type == "Drop") {
      view.delete(d.string("key"));
    } else if (e.type == "Sum") {
      const entries = view.scan<Counter>(d.string("prefix"));
      const total = new Counter();
      for (let i = 0; i < entries.length; i++) total.n += entries[i].doc.n;
      view.put<Counter>(d.string("into"), total);
    } else if (e.type == "Fail") {
      fail(d.string("message"));
    } else if (e.type == "Panic") {
      throw new Error(d.string("message"));
    }
  }
}

register(new Fixture());

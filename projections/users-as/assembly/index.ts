// `users` in AssemblyScript: one profile document per user stream
// (`user-<id>`), in the SDK's per-stream form. Builds byte for byte the
// documents of the Rust `projections/users` over the same events.

import { Document, Event, JsonObject, JsonWriter, PerStream, register } from "kiln-sdk-as/assembly";
export { kiln_alloc, kiln_apply } from "kiln-sdk-as/assembly";

/** The Rust `Profile`, field for field and in its order. */
class Profile extends Document {
  id: string = "";
  name: string = "";
  email: string = "";
  registered_at: u64 = 0;
  renames: u32 = 0;
  logins: u64 = 0;
  failed_logins: u64 = 0;
  /** `Option<u64>`: set when `has_last_login`. */
  last_login: u64 = 0;
  has_last_login: bool = false;

  readJson(o: JsonObject): void {
    this.id = o.string("id");
    this.name = o.string("name");
    this.email = o.string("email");
    this.registered_at = o.u64("registered_at");
    this.renames = o.u32("renames");
    this.logins = o.u64("logins");
    this.failed_logins = o.u64("failed_logins");
    this.has_last_login = !o.isNull("last_login");
    if (this.has_last_login) this.last_login = o.u64("last_login");
  }

  writeJson(w: JsonWriter): void {
    w.beginObject()
      .key("id").string(this.id)
      .key("name").string(this.name)
      .key("email").string(this.email)
      .key("registered_at").u64(this.registered_at)
      .key("renames").u32(this.renames)
      .key("logins").u64(this.logins)
      .key("failed_logins").u64(this.failed_logins)
      .key("last_login").u64OrNull(this.has_last_login, this.last_login)
      .endObject();
  }
}

class Users extends PerStream<Profile> {
  apply(p: Profile, e: Event): Profile {
    const data = e.data;
    if (e.type == "UserRegistered") {
      const name = data.string("name");
      const email = data.string("email");
      p.id = e.streamKey;
      p.name = name;
      p.email = email;
      p.registered_at = e.timestamp;
    } else if (e.type == "UserRenamed") {
      p.name = data.string("name");
      p.renames += 1;
    } else if (e.type == "EmailChanged") {
      p.email = data.string("email");
    } else if (e.type == "UserLoggedIn") {
      p.logins += 1;
      p.last_login = e.timestamp;
      p.has_last_login = true;
    } else if (e.type == "LoginFailed") {
      p.failed_logins += 1;
    }
    return p;
  }
}

register(new Users());

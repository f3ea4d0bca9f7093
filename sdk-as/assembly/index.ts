// kiln-sdk-as: write kiln projections in AssemblyScript (sdk/ABI.md, ABI v1).
//
// An entry file registers one projection and re-exports the ABI's functions:
//
//     import { Event, PerStream, register } from "kiln-sdk-as/assembly";
//     export { kiln_alloc, kiln_apply } from "kiln-sdk-as/assembly";
//     class Users extends PerStream<Profile> { apply(p: Profile, e: Event): Profile { ... } }
//     register(new Users());
//
// `kiln-as build` compiles it (stub runtime, the SDK's abort handler) and adds
// the `kiln-manifest` custom section from package.json.

export { Event } from "./event";
export { Bytes, JsonKind, JsonObject, JsonValue, JsonWriter, parseJson, parseObject } from "./json";
export { Document, Entry, View } from "./view";
export { Keyed, PerStream, Projection, kiln_alloc, kiln_apply, register } from "./projection";
export { fail, failed, kilnAbort } from "./failure";

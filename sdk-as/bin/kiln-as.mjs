#!/usr/bin/env node
// kiln-as: builds an AssemblyScript projection into a kiln module.
//
//   kiln-as build [--entry assembly/index.ts] [--out build/<name>.wasm]
//                 [--name <view>] [--version <semver>]
//
// Compiles the entry with the flags ABI v1 needs (the stub runtime: every batch
// runs in a fresh instance, so nothing is ever freed; `abort` mapped to the
// SDK's handler, which reports through `kiln.panic`; no other imports), then
// appends the `kiln-manifest` custom section: the name, events and categories
// from package.json's "kiln" field, the version from package.json's "version".
// Run it from the project's directory (npm scripts do).

import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import asc from "assemblyscript/asc";

const NAME_PART = /^[A-Za-z][A-Za-z0-9_]*$/;
const SEMVER =
  /^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$/;

function die(message) {
  process.stderr.write(`kiln-as: ${message}\n`);
  process.exit(1);
}

function parseArgs(argv) {
  const [command, ...rest] = argv;
  const opts = {};
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i];
    if (!a.startsWith("--") || i + 1 >= rest.length) die(`unexpected argument ${a}`);
    opts[a.slice(2)] = rest[++i];
  }
  return { command, opts };
}

/** The manifest JSON, exactly as sdk/ABI.md shows it (field order included). */
export function manifestJson({ name, version, events, categories, perStream = false }) {
  if (typeof name !== "string" || !name.split("-").every((p) => NAME_PART.test(p)))
    die(`the view name ${JSON.stringify(name)} must be '-'-separated parts of ASCII letters, digits and _, each starting with a letter`);
  if (typeof version !== "string" || !SEMVER.test(version))
    die(`the version ${JSON.stringify(version)} is not a semantic version without build metadata`);
  for (const list of [events, categories]) {
    if (!Array.isArray(list) || !list.every((s) => typeof s === "string" && /^[\x20-\x7e]*$/.test(s) && !/["\\]/.test(s)))
      die("events and categories must be lists of printable ASCII strings without quotes or backslashes");
  }
  if (typeof perStream !== "boolean") die("kiln.per_stream must be true or false");
  // `per_stream` only when true, as the Rust SDK writes it (sdk/ABI.md).
  const manifest = { abi: 1, name, version, events, categories };
  if (perStream) manifest.per_stream = true;
  return JSON.stringify(manifest);
}

function leb(n) {
  const out = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return out;
}

/** `wasm` with a custom section `name` holding `payload` appended. */
export function withCustomSection(wasm, name, payload) {
  const nameBytes = Buffer.from(name, "utf8");
  const body = Buffer.concat([Buffer.from(leb(nameBytes.length)), nameBytes, Buffer.from(payload, "utf8")]);
  return Buffer.concat([wasm, Buffer.from([0, ...leb(body.length)]), body]);
}

async function build(opts) {
  let pkg = {};
  try {
    pkg = JSON.parse(readFileSync("package.json", "utf8"));
  } catch (e) {
    if (!opts.name || !opts.version) die(`reading package.json: ${e.message}`);
  }
  const kiln = pkg.kiln ?? {};
  const manifest = manifestJson({
    name: opts.name ?? kiln.name,
    version: opts.version ?? pkg.version,
    events: kiln.events ?? [],
    categories: kiln.categories ?? [],
    perStream: kiln.per_stream ?? false,
  });
  const name = opts.name ?? kiln.name;
  const entry = opts.entry ?? kiln.entry ?? "assembly/index.ts";
  const out = resolve(opts.out ?? `build/${name}.wasm`);
  mkdirSync(dirname(out), { recursive: true });
  const { error, stderr } = await asc.main(
    [
      entry,
      "--outFile", out,
      "--runtime", "stub",
      "--optimizeLevel", "3",
      "--shrinkLevel", "0",
      "--use", `abort=${opts.abort ?? "~lib/kiln-sdk-as/assembly/failure/kilnAbort"}`,
    ],
    { stdout: process.stdout, stderr: process.stderr },
  );
  if (error) die(`asc failed: ${error.message}\n${stderr.toString()}`);
  const wasm = readFileSync(out);
  writeFileSync(out, withCustomSection(wasm, "kiln-manifest", manifest));
  process.stderr.write(`kiln-as: built ${out} (${manifest})\n`);
}

const { command, opts } = parseArgs(process.argv.slice(2));
if (command === "build") await build(opts);
else die("usage: kiln-as build [--entry FILE] [--out FILE] [--name VIEW] [--version SEMVER]");

//! The fingerprint: a module's logic, with what a rebuild at another version
//! changes left out.
//!
//! Bumping a crate's version changes more than the manifest: cargo hashes the
//! version into the crate's metadata, which renames every symbol the crate
//! instantiates, and the linker lays functions and read-only data out in
//! symbol order. So two builds of the same source at two versions hold the
//! same functions and the same data objects, in another order and at other
//! addresses. The fingerprint hashes a canonical form that is blind to that
//! order and nothing else:
//!
//! - **Functions** are renumbered in first-reach order: exports (by name), the
//!   start function, then calls, `ref.func`s and function pointers in the
//!   order the walk meets them. Every function index in the module (calls,
//!   `ref.func`, exports, start, element segments) is rewritten, so this
//!   renumbering alone never makes two different modules equal.
//! - **Data** is compared object by object, in first-reach order, when the
//!   module carries the linker's relocations (`--emit-relocs`: the `linking`
//!   and `reloc.*` custom sections; kiln's projections set it in their
//!   `build.rs`). Each address in code or data is then replaced by (object,
//!   offset within it), each table slot by the function it holds; an
//!   unrelocated constant that happens to point into data counts both as its
//!   value and as the object it would point to. Without relocations, or when
//!   they do not account for the data (data outside every symbol, a section
//!   without relocations), data and table slots are hashed as laid out: a
//!   rebuild may then look changed (a replay), never the other way round.
//! - Everything else (types, imports, memory, globals, constants) is hashed
//!   as it is; custom sections (names, producers, debug info) are ignored,
//!   and the manifest counts without its version.
//!
//! Each part (`manifest`, `interface`, `code`, `data`, `table`) has its own
//! digest, so a deploy can say what differed from another version.
//!
//! What a version bump changed, measured on `projections/users` built at
//! 1.0.0 and 1.0.1 (fat LTO, as `scripts/build-projections` builds) before
//! this scheme: the type, element, code and data sections all differed.
//! 63 of 275 functions sat at other indices (and so every call to them);
//! the element segment listed the table's functions in another order; the
//! read-only data held serde's strings for the crate's types in another
//! order (226 bytes), and with them every address pointing there; the data
//! held a copy of the manifest (`#[used]` on the manifest static) and the
//! 16-byte `TypeId` of the SDK's per-batch memo (`Box<dyn Any>`), both now
//! gone from the SDK. What remains is layout, which this canonical form
//! leaves out. Cargo's default profile (no LTO, 16 codegen units) shows the
//! same.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::ops::Range;

use wasmparser::{
    BinaryReader, BlockType, CompositeInnerType, ConstExpr, DataKind, ElementItems, ElementKind,
    ExternalKind, KnownCustom, Linking, Operator, Parser, Payload, RefType, RelocationType,
    SymbolInfo, TableInit, TypeRef, ValType, WasmFeatures,
};

/// The fingerprint scheme; stored fingerprints carry it as a prefix, so a
/// fingerprint computed by another scheme never equals one of this scheme.
pub const SCHEME: &str = "v2";

/// A module's identity for "unchanged logic". Displayed as `v2:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}:{}", hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How the module's data and table were compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Form {
    /// Object by object through the linker's relocations: layout ignored.
    Relocated,
    /// As laid out, for the reason given.
    LaidOut { reason: String },
}

/// The fingerprint and the digests of its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FingerprintReport {
    pub fingerprint: Fingerprint,
    pub form: Form,
    /// `(part, first 16 hex digits of its digest)`, in a fixed order:
    /// `manifest`, `interface`, `code`, `data`, `table`.
    pub parts: Vec<(&'static str, String)>,
}

impl FingerprintReport {
    /// The parts as a map (what the registry stores).
    pub fn part_map(&self) -> BTreeMap<String, String> {
        self.parts
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }
}

/// What the parts mean, for messages.
pub fn describe_part(part: &str) -> &'static str {
    match part {
        "manifest" => "manifest (name, event types, categories)",
        "interface" => "interface (types, imports, exports, memory, globals)",
        "code" => "code",
        "data" => "data",
        "table" => "function table",
        _ => "unknown part",
    }
}

/// A module the parser refuses (the loader compiles a module first, so
/// wasmtime's reason usually comes before this one).
#[derive(Debug, thiserror::Error)]
#[error("the module does not parse: {0}")]
pub struct FingerprintError(#[from] wasmparser::BinaryReaderError);

/// Fingerprints a module. `manifest` is the manifest's bytes with the version
/// left out.
pub fn fingerprint(bytes: &[u8], manifest: &[u8]) -> Result<FingerprintReport, FingerprintError> {
    let m = ModuleParts::parse(bytes)?;
    let relocs = match Relocs::new(&m) {
        Ok(r) => Some(r),
        Err(reason) => {
            return Ok(m.finish(manifest, None, reason));
        }
    };
    Ok(m.finish(manifest, relocs, String::new()))
}

/// The pieces of a module the fingerprint needs, with absolute byte ranges.
#[derive(Default)]
struct ModuleParts<'a> {
    bytes: &'a [u8],
    /// Raw payloads of memories, tags, data count (section id first).
    interface: Vec<(u8, &'a [u8])>,
    /// Each type's encoding, when it is a plain function type (no type
    /// index inside, so types can be renumbered like functions).
    types: Vec<Option<Vec<u8>>>,
    /// The raw type section.
    type_section: &'a [u8],
    /// Are types renumbered? Only when every type is a plain function type
    /// and the module validates without the proposals whose instructions
    /// carry type indices this walk does not rewrite (GC, typed function
    /// references, exceptions).
    renumber_types: bool,
    imports: Vec<(&'a str, &'a str, TypeRef)>,
    imported_funcs: u32,
    /// Tables: the raw type, and the initialiser (if any).
    tables: Vec<(&'a [u8], Option<ConstExpr<'a>>)>,
    /// Globals: the raw type, and the initialiser.
    globals: Vec<(&'a [u8], ConstExpr<'a>)>,
    /// Type index of each defined function.
    func_types: Vec<u32>,
    exports: Vec<(&'a str, ExternalKind, u32)>,
    start: Option<u32>,
    elements: Vec<Element<'a>>,
    /// Absolute range of each defined function's body (locals and code).
    bodies: Vec<Range<usize>>,
    /// Absolute start of the code section's payload (reloc offsets count from it).
    code_payload: usize,
    data: Vec<Segment>,
    data_payload: usize,
    /// Section index (custom sections counted) of the code and data sections.
    code_index: Option<u32>,
    data_index: Option<u32>,
    linking: Option<Range<usize>>,
    reloc_sections: Vec<Range<usize>>,
}

struct Element<'a> {
    /// Raw framing: kind and offset expression.
    head: Vec<u8>,
    /// Function indices (a segment of functions).
    funcs: Vec<u32>,
    /// Or expressions (a segment of expressions).
    exprs: Vec<ConstExpr<'a>>,
}

struct Segment {
    /// Active segment: the raw offset expression; passive: empty.
    head: Vec<u8>,
    /// Start address for an active segment with a constant `i32.const` offset.
    address: Option<u32>,
    /// Absolute range of the segment's bytes.
    range: Range<usize>,
}

impl<'a> ModuleParts<'a> {
    fn parse(bytes: &'a [u8]) -> wasmparser::Result<ModuleParts<'a>> {
        let mut m = ModuleParts {
            bytes,
            ..Default::default()
        };
        let mut section_index: u32 = 0;
        for payload in Parser::new(0).parse_all(bytes) {
            let payload = payload?;
            let counted = payload.as_section().is_some();
            match &payload {
                Payload::TypeSection(r) => {
                    m.type_section = &bytes[r.range()];
                    for group in r.clone() {
                        let group = group?;
                        let plain = !group.is_explicit_rec_group();
                        for t in group.types() {
                            m.types.push(plain.then(|| plain_func_type(t)).flatten());
                        }
                    }
                }
                Payload::ImportSection(r) => {
                    for import in r.clone().into_imports() {
                        let import = import?;
                        if matches!(import.ty, TypeRef::Func(_)) {
                            m.imported_funcs += 1;
                        }
                        m.imports.push((import.module, import.name, import.ty));
                    }
                }
                Payload::FunctionSection(r) => {
                    for t in r.clone() {
                        m.func_types.push(t?);
                    }
                }
                Payload::TableSection(r) => {
                    let end = r.range().end;
                    let entries = r
                        .clone()
                        .into_iter_with_offsets()
                        .collect::<Result<Vec<_>, _>>()?;
                    for (i, (at, t)) in entries.iter().enumerate() {
                        let next = entries.get(i + 1).map_or(end, |(n, _)| *n);
                        // The entry's bytes up to its initialiser (if any).
                        let (ty, init) = match &t.init {
                            TableInit::RefNull => (&bytes[*at..next], None),
                            TableInit::Expr(e) => (
                                &bytes[*at..e.get_binary_reader().range().start],
                                Some(e.clone()),
                            ),
                        };
                        m.tables.push((ty, init));
                    }
                }
                Payload::MemorySection(r) => m.interface.push((5, &bytes[r.range()])),
                Payload::TagSection(r) => m.interface.push((13, &bytes[r.range()])),
                Payload::GlobalSection(r) => {
                    for entry in r.clone().into_iter_with_offsets() {
                        let (at, g) = entry?;
                        let init = g.init_expr.get_binary_reader().range().start;
                        m.globals.push((&bytes[at..init], g.init_expr));
                    }
                }
                Payload::DataCountSection { range, .. } => {
                    m.interface.push((12, &bytes[range.clone()]))
                }
                Payload::ExportSection(r) => {
                    for e in r.clone() {
                        let e = e?;
                        m.exports.push((e.name, e.kind, e.index));
                    }
                }
                Payload::StartSection { func, .. } => m.start = Some(*func),
                Payload::ElementSection(r) => {
                    for e in r.clone() {
                        let e = e?;
                        let mut head = Vec::new();
                        match &e.kind {
                            ElementKind::Passive => head.push(0),
                            ElementKind::Declared => head.push(1),
                            ElementKind::Active {
                                table_index,
                                offset_expr,
                            } => {
                                head.push(2);
                                head.extend(table_index.unwrap_or(0).to_le_bytes());
                                head.extend(raw(bytes, offset_expr.get_binary_reader()));
                            }
                        }
                        let mut funcs = Vec::new();
                        let mut exprs = Vec::new();
                        match e.items {
                            ElementItems::Functions(r) => {
                                for f in r {
                                    funcs.push(f?);
                                }
                            }
                            ElementItems::Expressions(ty, r) => {
                                head.extend(format!("x{ty:?}").as_bytes());
                                exprs = Vec::new();
                                for expr in r {
                                    exprs.push(expr?);
                                }
                            }
                        }
                        m.elements.push(Element { head, funcs, exprs });
                    }
                }
                Payload::CodeSectionStart { range, .. } => {
                    m.code_payload = range.start;
                    m.code_index = Some(section_index);
                }
                Payload::CodeSectionEntry(body) => m.bodies.push(body.range()),
                Payload::DataSection(r) => {
                    m.data_payload = r.range().start;
                    m.data_index = Some(section_index);
                    for d in r.clone() {
                        let d = d?;
                        let start = d.data.as_ptr() as usize - bytes.as_ptr() as usize;
                        let (head, address) = match &d.kind {
                            DataKind::Passive => (Vec::new(), None),
                            DataKind::Active {
                                memory_index,
                                offset_expr,
                            } => {
                                let mut head = memory_index.to_le_bytes().to_vec();
                                head.extend(raw(bytes, offset_expr.get_binary_reader()));
                                let mut ops = offset_expr.get_operators_reader();
                                let address = match (ops.read(), ops.read()) {
                                    (Ok(Operator::I32Const { value }), Ok(Operator::End)) => {
                                        Some(value as u32)
                                    }
                                    _ => None,
                                };
                                (head, address)
                            }
                        };
                        m.data.push(Segment {
                            head,
                            address,
                            range: start..start + d.data.len(),
                        });
                    }
                }
                Payload::CustomSection(c) => {
                    let data = c.data_offset()..c.data_offset() + c.data().len();
                    match c.as_known() {
                        KnownCustom::Linking(_) => m.linking = Some(data),
                        KnownCustom::Reloc(_) => m.reloc_sections.push(data),
                        _ => {}
                    }
                }
                _ => {}
            }
            if counted {
                section_index += 1;
            }
        }
        let features = WasmFeatures::WASM2
            | WasmFeatures::TAIL_CALL
            | WasmFeatures::EXTENDED_CONST
            | WasmFeatures::RELAXED_SIMD;
        m.renumber_types = m.types.iter().all(Option::is_some)
            && wasmparser::Validator::new_with_features(features)
                .validate_all(bytes)
                .is_ok();
        Ok(m)
    }

    /// Hashes the canonical form. With `relocs`, data objects and table slots
    /// are compared through them; without, as laid out (`why` says why).
    fn finish(&self, manifest: &[u8], relocs: Option<Relocs>, why: String) -> FingerprintReport {
        let mut walk = Walk::new(self, relocs.as_ref());
        let code = walk.run();
        let data = match &relocs {
            Some(r) => walk.data_objects(r),
            None => self.data_as_laid_out(),
        };
        let table = walk.table(relocs.is_some());

        let mut interface = Part::new("interface");
        for (module, name, ty) in &self.imports {
            interface.chunk(module.as_bytes());
            interface.chunk(name.as_bytes());
            match ty {
                TypeRef::Func(t) => {
                    let t = walk.canonical_type(*t);
                    interface.bytes(b"f");
                    interface.bytes(&t.to_le_bytes());
                }
                other => interface.chunk(format!("{other:?}").as_bytes()),
            }
        }
        for (ty, init) in &self.tables {
            interface.chunk(ty);
            if let Some(init) = init {
                walk.const_expr(init, &mut interface);
            }
        }
        for (ty, init) in &self.globals {
            interface.chunk(ty);
            walk.const_expr(init, &mut interface);
        }
        for (id, payload) in &self.interface {
            interface.bytes(&[*id]);
            interface.chunk(payload);
        }
        walk.types(&mut interface);
        let mut exports: Vec<_> = self.exports.clone();
        exports.sort_by(|a, b| a.0.cmp(b.0));
        for (name, kind, index) in exports {
            interface.chunk(name.as_bytes());
            interface.bytes(&[kind as u8]);
            let index = match kind {
                ExternalKind::Func => walk.canonical(index),
                _ => index,
            };
            interface.bytes(&index.to_le_bytes());
        }
        if let Some(start) = self.start {
            interface.bytes(b"start");
            interface.bytes(&walk.canonical(start).to_le_bytes());
        }
        let mut man = Part::new("manifest");
        man.chunk(manifest);

        let form = match relocs {
            Some(_) => Form::Relocated,
            None => Form::LaidOut { reason: why },
        };
        let parts = [man, interface, code, data, table];
        let mut all = blake3::Hasher::new();
        all.update(b"kiln-fingerprint-v2");
        all.update(match form {
            Form::Relocated => b"relocated",
            Form::LaidOut { .. } => b"laid-out!",
        });
        let mut shown = Vec::new();
        for p in parts {
            let digest = p.hasher.finalize();
            all.update(p.name.as_bytes());
            all.update(digest.as_bytes());
            shown.push((p.name, hex(&digest.as_bytes()[..8])));
        }
        FingerprintReport {
            fingerprint: Fingerprint(*all.finalize().as_bytes()),
            form,
            parts: shown,
        }
    }

    fn data_as_laid_out(&self) -> Part {
        let mut p = Part::new("data");
        for s in &self.data {
            p.chunk(&s.head);
            p.chunk(&self.bytes[s.range.clone()]);
        }
        p
    }

    /// The segment and offset within it of an absolute file offset.
    fn segment_at(&self, at: usize) -> Option<(usize, usize)> {
        self.data
            .iter()
            .position(|s| s.range.contains(&at))
            .map(|i| (i, at - self.data[i].range.start))
    }
}

fn raw<'a>(bytes: &'a [u8], reader: BinaryReader<'_>) -> &'a [u8] {
    &bytes[reader.range()]
}

/// A digest under construction.
struct Part {
    name: &'static str,
    hasher: blake3::Hasher,
}

impl Part {
    fn new(name: &'static str) -> Part {
        Part {
            name,
            hasher: blake3::Hasher::new(),
        }
    }

    fn bytes(&mut self, b: &[u8]) {
        self.hasher.update(b);
    }

    /// Length-prefixed, so that two chunks never read as another two.
    fn chunk(&mut self, b: &[u8]) {
        self.hasher.update(&(b.len() as u64).to_le_bytes());
        self.hasher.update(b);
    }
}

/// A data object: a defined data symbol's bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Object {
    segment: usize,
    offset: usize,
    size: usize,
}

/// What a relocated field refers to.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// An address: `object` + `addend`.
    Memory { object: usize, addend: i64 },
    /// A table slot holding this function.
    Slot { func: u32 },
    /// Something kept as it is (a global, a type, an absolute symbol).
    Raw,
}

/// The linker's relocations, resolved to objects and functions.
struct Relocs {
    objects: Vec<Object>,
    /// (address, end, object) of the objects in active segments, by address.
    by_address: Vec<(u64, u64, usize)>,
    /// Relocated fields in code, by absolute file offset: (field end, target).
    code: BTreeMap<usize, (usize, Target)>,
    /// Relocated fields in data, by (segment, offset): (field end, target).
    data: BTreeMap<(usize, usize), (usize, Target)>,
}

impl Relocs {
    /// Reads the relocations, or says why the module's layout cannot be
    /// accounted for by them.
    fn new(m: &ModuleParts<'_>) -> Result<Relocs, String> {
        let linking = m
            .linking
            .clone()
            .ok_or("the module carries no relocations: it was linked without --emit-relocs")?;

        let bad = |e: wasmparser::BinaryReaderError| format!("unreadable relocations: {e}");
        let reader = wasmparser::LinkingSectionReader::new(BinaryReader::new(
            &m.bytes[linking.clone()],
            linking.start,
        ))
        .map_err(bad)?;
        // Symbols: functions by their index, data by their object.
        enum Sym {
            Func(u32),
            /// A defined data symbol's range, or `None` (undefined, absolute
            /// or empty: its relocations keep their value).
            Data(Option<Object>),
            Other,
        }
        let mut symbols = Vec::new();
        for sub in reader.subsections() {
            if let Linking::SymbolTable(table) = sub.map_err(bad)? {
                for sym in table {
                    symbols.push(match sym.map_err(bad)? {
                        SymbolInfo::Func { index, .. } => Sym::Func(index),
                        SymbolInfo::Data {
                            symbol: Some(d), ..
                        } if d.size > 0 => Sym::Data(Some(Object {
                            segment: d.index as usize,
                            offset: d.offset as usize,
                            size: d.size as usize,
                        })),
                        SymbolInfo::Data { .. } => Sym::Data(None),
                        _ => Sym::Other,
                    });
                }
            }
        }
        // Objects: symbols' ranges, overlapping ones (merged strings: one a
        // suffix of another) joined into one.
        let mut ranges: Vec<Object> = symbols
            .iter()
            .filter_map(|s| match s {
                Sym::Data(Some(o)) => Some(*o),
                _ => None,
            })
            .collect();
        ranges.sort();
        let mut objects: Vec<Object> = Vec::new();
        for o in ranges {
            if o.segment >= m.data.len() || o.offset + o.size > m.data[o.segment].range.len() {
                return Err(format!(
                    "a data symbol lies outside its segment ({} at {})",
                    o.segment, o.offset
                ));
            }
            match objects.last_mut() {
                Some(last) if last.segment == o.segment && last.offset + last.size > o.offset => {
                    last.size = last.size.max(o.offset + o.size - last.offset);
                }
                _ => objects.push(o),
            }
        }
        let object_of = |o: &Object| -> (usize, i64) {
            let i = objects.partition_point(|x| (x.segment, x.offset) <= (o.segment, o.offset)) - 1;
            (i, (o.offset - objects[i].offset) as i64)
        };
        // Every non-zero byte of data must belong to an object.
        for (i, s) in m.data.iter().enumerate() {
            let seg = &m.bytes[s.range.clone()];
            let mut covered = 0;
            for o in objects.iter().filter(|o| o.segment == i) {
                if let Some(at) = seg[covered..o.offset].iter().position(|b| *b != 0) {
                    return Err(format!(
                        "data at offset {} of segment {i} belongs to no symbol",
                        covered + at
                    ));
                }
                covered = o.offset + o.size;
            }
            if let Some(at) = seg[covered.min(seg.len())..].iter().position(|b| *b != 0) {
                return Err(format!(
                    "data at offset {} of segment {i} belongs to no symbol",
                    covered + at
                ));
            }
        }

        let mut code = BTreeMap::new();
        let mut data = BTreeMap::new();
        let (mut saw_code, mut saw_data) = (false, false);
        for range in &m.reloc_sections {
            let r = wasmparser::RelocSectionReader::new(BinaryReader::new(
                &m.bytes[range.clone()],
                range.start,
            ))
            .map_err(bad)?;
            let section = r.section_index();
            let in_code = Some(section) == m.code_index;
            let in_data = Some(section) == m.data_index;
            saw_code |= in_code;
            saw_data |= in_data;
            for entry in r.entries() {
                let e = entry.map_err(bad)?;
                let field = e.relocation_range().map_err(bad)?;
                let target = match e.ty {
                    RelocationType::MemoryAddrLeb
                    | RelocationType::MemoryAddrSleb
                    | RelocationType::MemoryAddrI32
                    | RelocationType::MemoryAddrLeb64
                    | RelocationType::MemoryAddrSleb64
                    | RelocationType::MemoryAddrI64 => match symbols.get(e.index as usize) {
                        Some(Sym::Data(Some(o))) => {
                            let (object, delta) = object_of(o);
                            let addend = delta + e.addend;
                            // Past its object's end (one past is an end
                            // pointer), an address depends on what the linker
                            // put next: it keeps its value.
                            if (0..=objects[object].size as i64).contains(&addend) {
                                Target::Memory { object, addend }
                            } else {
                                Target::Raw
                            }
                        }
                        Some(Sym::Data(None)) => Target::Raw,
                        _ => {
                            return Err(format!(
                                "a memory relocation names symbol {} that is not data",
                                e.index
                            ));
                        }
                    },
                    RelocationType::TableIndexSleb
                    | RelocationType::TableIndexI32
                    | RelocationType::TableIndexSleb64
                    | RelocationType::TableIndexI64 => match symbols.get(e.index as usize) {
                        Some(Sym::Func(func)) => Target::Slot { func: *func },
                        _ => {
                            return Err(format!(
                                "a table relocation names symbol {} that is not a function",
                                e.index
                            ));
                        }
                    },
                    RelocationType::FunctionIndexLeb
                    | RelocationType::TypeIndexLeb
                    | RelocationType::GlobalIndexLeb
                    | RelocationType::GlobalIndexI32
                    | RelocationType::TableNumberLeb
                    | RelocationType::FunctionOffsetI32
                    | RelocationType::FunctionOffsetI64
                    | RelocationType::SectionOffsetI32
                    | RelocationType::EventIndexLeb
                    | RelocationType::FunctionIndexI32 => Target::Raw,
                    other => return Err(format!("relocation type {other:?} is not supported")),
                };
                if in_code {
                    let start = m.code_payload + field.start;
                    code.insert(start, (m.code_payload + field.end, target));
                } else if in_data {
                    let start = m.data_payload + field.start;
                    let end = m.data_payload + field.end;
                    let (seg, off) = m
                        .segment_at(start)
                        .ok_or("a data relocation lies outside every segment")?;
                    if end > m.data[seg].range.end {
                        return Err("a data relocation runs past its segment".into());
                    }
                    data.insert((seg, off), (off + field.len(), target));
                }
            }
        }
        // The relocations are trusted to list every address in data (the
        // linker writes one for each); a module without any for its data or
        // code sections is not taken at its word.
        if !m.data.is_empty() && !saw_data {
            return Err("the module carries no relocations for its data section".into());
        }
        if !m.bodies.is_empty() && !saw_code {
            return Err("the module carries no relocations for its code section".into());
        }
        let mut by_address: Vec<(u64, u64, usize)> = objects
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let start = u64::from(m.data[o.segment].address?) + o.offset as u64;
                Some((start, start + o.size as u64, i))
            })
            .collect();
        by_address.sort_unstable();
        Ok(Relocs {
            objects,
            by_address,
            code,
            data,
        })
    }

    /// Where an unrelocated constant would point if it were an address: the
    /// object holding that address and the offset in it, or `None` outside
    /// every object (in no segment, or in padding).
    fn object_at(&self, value: u64) -> Option<(usize, i64)> {
        let i = self
            .by_address
            .partition_point(|(start, _, _)| *start <= value);
        let (start, end, object) = *self.by_address.get(i.checked_sub(1)?)?;
        (value < end).then(|| (object, (value - start) as i64))
    }
}

fn memarg_offset(op: &Operator<'_>) -> Option<u64> {
    use Operator::*;
    match op {
        I32Load { memarg }
        | I64Load { memarg }
        | F32Load { memarg }
        | F64Load { memarg }
        | I32Load8S { memarg }
        | I32Load8U { memarg }
        | I32Load16S { memarg }
        | I32Load16U { memarg }
        | I64Load8S { memarg }
        | I64Load8U { memarg }
        | I64Load16S { memarg }
        | I64Load16U { memarg }
        | I64Load32S { memarg }
        | I64Load32U { memarg }
        | I32Store { memarg }
        | I64Store { memarg }
        | F32Store { memarg }
        | F64Store { memarg }
        | I32Store8 { memarg }
        | I32Store16 { memarg }
        | I64Store8 { memarg }
        | I64Store16 { memarg }
        | I64Store32 { memarg } => Some(memarg.offset),
        _ => None,
    }
}

/// The first-reach walk over functions (and, with relocations, data objects).
struct Walk<'m> {
    m: &'m ModuleParts<'m>,
    relocs: Option<&'m Relocs>,
    /// Canonical index of each function reached so far (imports keep theirs).
    order: HashMap<u32, u32>,
    funcs: VecDeque<u32>,
    /// Canonical index of each data object reached so far.
    object_order: HashMap<usize, u32>,
    objects: VecDeque<usize>,
    /// The objects [`Walk::run`] reached, hashed in reach order.
    data_part: Option<Part>,
    /// Canonical index of each type reached so far, and the reach order.
    type_order: HashMap<u32, u32>,
    type_list: Vec<u32>,
}

impl<'m> Walk<'m> {
    fn new(m: &'m ModuleParts<'m>, relocs: Option<&'m Relocs>) -> Walk<'m> {
        let mut w = Walk {
            m,
            relocs,
            order: HashMap::new(),
            funcs: VecDeque::new(),
            object_order: HashMap::new(),
            objects: VecDeque::new(),
            data_part: None,
            type_order: HashMap::new(),
            type_list: Vec::new(),
        };
        for (_, _, ty) in &m.imports {
            if let TypeRef::Func(t) = ty {
                w.reach_type(*t);
            }
        }
        let mut exports: Vec<_> = m.exports.clone();
        exports.sort_by(|a, b| a.0.cmp(b.0));
        for (_, kind, index) in exports {
            if kind == ExternalKind::Func {
                w.reach(index);
            }
        }
        if let Some(start) = m.start {
            w.reach(start);
        }
        w
    }

    /// The canonical index of function `f`, numbering it if it is new.
    fn reach(&mut self, f: u32) -> u32 {
        if f < self.m.imported_funcs {
            return f;
        }
        let next = self.m.imported_funcs + self.order.len() as u32;
        *self.order.entry(f).or_insert_with(|| {
            self.funcs.push_back(f);
            next
        })
    }

    /// The canonical index of a function the walk has numbered (every
    /// function is numbered once [`Walk::run`] returns).
    fn canonical(&self, f: u32) -> u32 {
        if f < self.m.imported_funcs {
            return f;
        }
        self.order.get(&f).copied().unwrap_or(u32::MAX)
    }

    /// The canonical index of type `t` (its own when types keep their indices).
    fn reach_type(&mut self, t: u32) -> u32 {
        if !self.m.renumber_types {
            return t;
        }
        let next = self.type_order.len() as u32;
        *self.type_order.entry(t).or_insert_with(|| {
            self.type_list.push(t);
            next
        })
    }

    fn canonical_type(&mut self, t: u32) -> u32 {
        self.reach_type(t)
    }

    /// The types: in reach order (then any unreached, in module order) when
    /// renumbered, else the raw section.
    fn types(&mut self, out: &mut Part) {
        if !self.m.renumber_types {
            out.bytes(b"raw types");
            out.chunk(self.m.type_section);
            return;
        }
        for t in 0..self.m.types.len() as u32 {
            self.reach_type(t);
        }
        out.bytes(b"types");
        for t in &self.type_list {
            if let Some(Some(enc)) = self.m.types.get(*t as usize) {
                out.chunk(enc);
            }
        }
    }

    /// A constant expression, with `ref.func` renumbered.
    fn const_expr(&mut self, e: &ConstExpr<'_>, out: &mut Part) {
        let bytes = self.m.bytes;
        let mut ops = e.get_operators_reader();
        out.bytes(b"E");
        while !ops.eof() {
            let Ok((op, at)) = ops.read_with_offset() else {
                out.chunk(&bytes[e.get_binary_reader().range()]);
                return;
            };
            let end = ops.original_position();
            if let Operator::RefFunc { function_index } = op {
                let c = self.canonical(function_index);
                out.bytes(b"C");
                out.bytes(&c.to_le_bytes());
            } else {
                out.chunk(&bytes[at..end]);
            }
        }
    }

    fn reach_object(&mut self, o: usize) -> u32 {
        let next = self.object_order.len() as u32;
        *self.object_order.entry(o).or_insert_with(|| {
            self.objects.push_back(o);
            next
        })
    }

    fn target(&mut self, t: Target, raw: &[u8], out: &mut Part) {
        match t {
            Target::Memory { object, addend } => {
                let c = self.reach_object(object);
                out.bytes(b"M");
                out.bytes(&c.to_le_bytes());
                out.bytes(&addend.to_le_bytes());
            }
            Target::Slot { func } => {
                let c = self.reach(func);
                out.bytes(b"T");
                out.bytes(&c.to_le_bytes());
            }
            Target::Raw => {
                out.bytes(b"R");
                out.chunk(raw);
            }
        }
    }

    /// Walks every function (and data object) and hashes the code part.
    fn run(&mut self) -> Part {
        let mut code = Part::new("code");
        let mut data = Part::new("data-objects");
        let defined = self.m.bodies.len() as u32;
        let mut leftovers = (0..defined).map(|i| self.m.imported_funcs + i);
        loop {
            if let Some(f) = self.funcs.pop_front() {
                self.function(f, &mut code);
            } else if let Some(o) = self.objects.pop_front() {
                self.object(o, &mut data);
            } else if let Some(f) = leftovers.find(|f| !self.order.contains_key(f)) {
                // Reached through no export, call or pointer (a table entry
                // only, or dead code): numbered in module order.
                self.reach(f);
            } else {
                break;
            }
        }
        self.data_part = Some(data);
        code
    }

    fn function(&mut self, f: u32, out: &mut Part) {
        let i = (f - self.m.imported_funcs) as usize;
        let (Some(body), Some(ty)) = (self.m.bodies.get(i), self.m.func_types.get(i)) else {
            return;
        };
        let ty = self.reach_type(*ty);
        out.bytes(b"F");
        out.bytes(&ty.to_le_bytes());
        let bytes = self.m.bytes;
        let reader =
            wasmparser::FunctionBody::new(BinaryReader::new(&bytes[body.clone()], body.start));
        let Ok(mut ops) = reader.get_operators_reader() else {
            out.chunk(&bytes[body.clone()]);
            return;
        };
        // Locals, raw.
        out.chunk(&bytes[body.start..ops.original_position()]);
        while !ops.eof() {
            let Ok((op, at)) = ops.read_with_offset() else {
                out.chunk(&bytes[ops.original_position()..body.end]);
                return;
            };
            let end = ops.original_position();
            let callee = match op {
                Operator::Call { function_index }
                | Operator::ReturnCall { function_index }
                | Operator::RefFunc { function_index } => Some(function_index),
                _ => None,
            };
            let typed = match op {
                Operator::CallIndirect {
                    type_index,
                    table_index,
                } => Some((0x11u8, type_index, table_index)),
                Operator::ReturnCallIndirect {
                    type_index,
                    table_index,
                } => Some((0x13, type_index, table_index)),
                Operator::Block {
                    blockty: BlockType::FuncType(t),
                } => Some((0x02, t, 0)),
                Operator::Loop {
                    blockty: BlockType::FuncType(t),
                } => Some((0x03, t, 0)),
                Operator::If {
                    blockty: BlockType::FuncType(t),
                } => Some((0x04, t, 0)),
                _ => None,
            };
            if let Some((opcode, t, table)) = typed {
                let t = self.reach_type(t);
                out.bytes(&[b'I', opcode]);
                out.bytes(&t.to_le_bytes());
                out.bytes(&table.to_le_bytes());
                continue;
            }
            if let Some(callee) = callee {
                // The opcode (and nothing else: the immediate is the index).
                let opcode = match op {
                    Operator::Call { .. } => 0x10u8,
                    Operator::ReturnCall { .. } => 0x12,
                    _ => 0xd2,
                };
                let c = self.reach(callee);
                out.bytes(&[b'C', opcode]);
                out.bytes(&c.to_le_bytes());
                continue;
            }
            let fields: Vec<(usize, usize, Target)> = match self.relocs {
                Some(r) => r
                    .code
                    .range(at..end)
                    .map(|(s, (e, t))| (*s, *e, *t))
                    .collect(),
                None => Vec::new(),
            };
            if fields.is_empty() {
                out.chunk(&bytes[at..end]);
                // An unrelocated constant that happens to be an address in
                // the data (`1 << 20` is where wasm32 data starts): it counts
                // as the number it is and as the object it would point to,
                // so the modules match under either reading.
                let value = match op {
                    Operator::I32Const { value } => Some(value as u32 as u64),
                    Operator::I64Const { value } => Some(value as u64),
                    _ => memarg_offset(&op),
                };
                if let (Some(r), Some(v)) = (self.relocs, value)
                    && let Some((object, offset)) = r.object_at(v)
                {
                    self.target(
                        Target::Memory {
                            object,
                            addend: offset,
                        },
                        &[],
                        out,
                    );
                }
                continue;
            }
            let mut from = at;
            for (start, field_end, target) in fields {
                let field_end = field_end.min(end);
                out.chunk(&bytes[from..start.max(from)]);
                self.target(target, &bytes[start..field_end], out);
                from = field_end.max(from);
            }
            out.chunk(&bytes[from..end]);
        }
    }

    fn object(&mut self, o: usize, out: &mut Part) {
        let Some(r) = self.relocs else { return };
        let obj = r.objects[o];
        let seg = &self.m.data[obj.segment];
        let bytes = &self.m.bytes[seg.range.clone()];
        out.bytes(b"D");
        out.bytes(&(obj.size as u64).to_le_bytes());
        let mut from = obj.offset;
        let end = obj.offset + obj.size;
        let fields: Vec<(usize, usize, Target)> = r
            .data
            .range((obj.segment, obj.offset)..(obj.segment, end))
            .map(|((_, s), (e, t))| (*s, *e, *t))
            .collect();
        for (start, field_end, target) in fields {
            out.chunk(&bytes[from..start.max(from)]);
            self.target(target, &bytes[start..field_end.min(bytes.len())], out);
            from = field_end.max(from);
        }
        out.chunk(&bytes[from.min(end)..end]);
    }

    /// The data part with relocations: the segments' framing (the same
    /// sizes, zero padding checked by [`Relocs::new`]), the objects in reach
    /// order, then any object nothing reached, in address order.
    fn data_objects(&mut self, r: &Relocs) -> Part {
        let mut p = Part::new("data");
        for s in &self.m.data {
            p.chunk(&s.head);
            p.bytes(&(s.range.len() as u64).to_le_bytes());
        }
        let mut rest: Vec<usize> = (0..r.objects.len())
            .filter(|o| !self.object_order.contains_key(o))
            .collect();
        rest.sort_by_key(|o| r.objects[*o]);
        let mut tail = Part::new("unreached");
        for o in rest {
            self.reach_object(o);
        }
        while let Some(o) = self.objects.pop_front() {
            self.object(o, &mut tail);
        }
        // Functions an unreached object points to are walked too.
        let mut code_tail = Part::new("code-tail");
        while let Some(f) = self.funcs.pop_front() {
            self.function(f, &mut code_tail);
        }
        if let Some(walked) = self.data_part.take() {
            p.bytes(walked.hasher.finalize().as_bytes());
        }
        p.bytes(tail.hasher.finalize().as_bytes());
        p.bytes(code_tail.hasher.finalize().as_bytes());
        p
    }

    /// The table part: each element segment's framing and functions. With
    /// relocations, slots are layout (every pointer to one is relocated), so
    /// a segment's functions count as a set; without, in slot order.
    fn table(&mut self, relocated: bool) -> Part {
        let mut p = Part::new("table");
        for e in &self.m.elements {
            p.chunk(&e.head);
            let mut funcs: Vec<u32> = e.funcs.iter().map(|f| self.canonical(*f)).collect();
            if relocated {
                funcs.sort_unstable();
            }
            p.bytes(&(funcs.len() as u64).to_le_bytes());
            for f in funcs {
                p.bytes(&f.to_le_bytes());
            }
            for e in &e.exprs {
                self.const_expr(e, &mut p);
            }
        }
        p
    }
}

/// The encoding of a function type without type indices inside, or `None`.
fn plain_func_type(t: &wasmparser::SubType) -> Option<Vec<u8>> {
    if !t.is_final || t.supertype_idx.is_some() || t.composite_type.shared {
        return None;
    }
    let CompositeInnerType::Func(f) = &t.composite_type.inner else {
        return None;
    };
    let mut out = vec![0x60];
    for list in [f.params(), f.results()] {
        out.extend((list.len() as u32).to_le_bytes());
        for v in list {
            out.push(match *v {
                ValType::I32 => 0x7f,
                ValType::I64 => 0x7e,
                ValType::F32 => 0x7d,
                ValType::F64 => 0x7c,
                ValType::V128 => 0x7b,
                ValType::Ref(r) if r == RefType::FUNCREF => 0x70,
                ValType::Ref(r) if r == RefType::EXTERNREF => 0x6f,
                ValType::Ref(_) => return None,
            });
        }
    }
    Some(out)
}

impl Form {
    /// How data was compared, for messages.
    pub fn describe(&self) -> String {
        match self {
            Form::Relocated => {
                "data compared object by object through the linker's relocations".to_string()
            }
            Form::LaidOut { reason } => format!(
                "data and function table compared as laid out, because {reason}; a rebuild \
                 at another version may then look changed: build with --emit-relocs (see the \
                 README)"
            ),
        }
    }
}

/// The deploy note of a module taken for `of`'s logic.
pub fn explain_alias(new: &FingerprintReport, of: &str) -> String {
    format!(
        "alias of {of}: the same fingerprint {}; {}",
        new.fingerprint,
        new.form.describe()
    )
}

/// The deploy note of a module that warms a view of its own: how its
/// fingerprint differs from `other`'s (the nearest version of the same name),
/// or that there is no other version.
pub fn explain_new_view(
    new: &FingerprintReport,
    other: Option<(&str, &str, &BTreeMap<String, String>)>,
) -> String {
    let mut note = format!("new view: fingerprint {}", new.fingerprint);
    match other {
        None => note.push_str(", no other version of this name to compare with"),
        Some((id, fp, _)) if !fp.starts_with(&format!("{SCHEME}:")) => note.push_str(&format!(
            "; {id}'s fingerprint {fp} was computed by an older kiln and is never \
             compared with this one (a one-off replay after an upgrade)"
        )),
        Some((id, fp, parts)) if parts.is_empty() => {
            note.push_str(&format!("; differs from {id}'s {fp}"))
        }
        Some((id, fp, parts)) => {
            let differing: Vec<&str> = new
                .parts
                .iter()
                .filter(|(name, digest)| parts.get(*name) != Some(digest))
                .map(|(name, _)| describe_part(name))
                .collect();
            if differing.is_empty() {
                note.push_str(&format!(
                    "; {id} ({fp}) has the same parts, compared differently (one module \
                     carries the linker's relocations, the other does not)"
                ));
            } else {
                note.push_str(&format!(
                    "; differs from {id} ({fp}) in: {}",
                    differing.join(", ")
                ));
            }
        }
    }
    if let Form::LaidOut { .. } = new.form {
        note.push_str("; ");
        note.push_str(&new.form.describe());
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(wat: &str) -> FingerprintReport {
        let bytes = wat::parse_str(wat).expect("test WAT");
        fingerprint(&bytes, b"{}").expect("fingerprint")
    }

    /// Two functions calling each other, through a table too, with the
    /// functions (and so every index) in the given order.
    fn module(order: [&str; 3], constant: i32, data: &str) -> String {
        let funcs = [
            ("a", "(func $a (param i32) (result i32) (call $b (local.get 0)))".to_string()),
            (
                "b",
                format!("(func $b (param i32) (result i32) (i32.add (local.get 0) (i32.const {constant})))"),
            ),
            (
                "c",
                "(func $c (param i32 i32) (result i32) (call_indirect (type $t) (local.get 0) (local.get 1)))"
                    .to_string(),
            ),
        ];
        let body: Vec<&str> = order
            .iter()
            .map(|n| {
                funcs
                    .iter()
                    .find(|f| f.0 == *n)
                    .map(|f| f.1.as_str())
                    .unwrap_or("")
            })
            .collect();
        format!(
            r#"(module
                (type $t (func (param i32) (result i32)))
                (memory (export "memory") 1)
                (table 2 funcref)
                (elem (i32.const 0) func $a $b)
                {}
                (export "kiln_alloc" (func $a))
                (export "kiln_apply" (func $c))
                (data (i32.const 1024) "{data}"))"#,
            body.join("\n")
        )
    }

    #[test]
    fn functions_in_another_order_share_a_fingerprint() {
        let one = fp(&module(["a", "b", "c"], 7, "hello"));
        let other = fp(&module(["c", "b", "a"], 7, "hello"));
        assert_eq!(one.fingerprint, other.fingerprint);
        assert_eq!(one.parts, other.parts);
    }

    #[test]
    fn a_changed_constant_changes_the_code_part_only() {
        let one = fp(&module(["a", "b", "c"], 7, "hello"));
        let other = fp(&module(["c", "b", "a"], 8, "hello"));
        assert_ne!(one.fingerprint, other.fingerprint);
        let differing: Vec<_> = one
            .parts
            .iter()
            .zip(&other.parts)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.0)
            .collect();
        assert_eq!(differing, ["code"]);
    }

    #[test]
    fn changed_data_changes_the_data_part() {
        let one = fp(&module(["a", "b", "c"], 7, "hello"));
        let other = fp(&module(["a", "b", "c"], 7, "hellp"));
        assert_ne!(one.fingerprint, other.fingerprint);
    }

    #[test]
    fn without_relocations_a_reordered_table_counts_as_changed() {
        // The same functions in the other slots: without the linker's
        // relocations, slots are compared as laid out.
        let one = module(["a", "b", "c"], 7, "hello");
        let other = one.replace("func $a $b)", "func $b $a)");
        let (one, other) = (fp(&one), fp(&other));
        assert!(matches!(one.form, Form::LaidOut { .. }), "{:?}", one.form);
        assert_ne!(one.fingerprint, other.fingerprint);
    }

    #[test]
    fn a_different_callee_is_a_different_fingerprint() {
        // `a` calls `b`, or `a` calls itself: same shapes, other call graph.
        let one = module(["a", "b", "c"], 7, "hello");
        let other = one.replace("(call $b (local.get 0))", "(call $a (local.get 0))");
        assert_ne!(fp(&one).fingerprint, fp(&other).fingerprint);
    }

    #[test]
    fn types_in_another_order_share_a_fingerprint() {
        let one = r#"(module
            (type (func (param i32) (result i32)))
            (type (func (param i64)))
            (func (export "f") (type 0) (local.get 0))
            (func (export "g") (type 1)))"#;
        let other = r#"(module
            (type (func (param i64)))
            (type (func (param i32) (result i32)))
            (func (export "g") (type 0))
            (func (export "f") (type 1) (local.get 0)))"#;
        assert_eq!(fp(one).fingerprint, fp(other).fingerprint);
        let changed = other.replace("(param i64)", "(param f64)");
        assert_ne!(fp(one).fingerprint, fp(&changed).fingerprint);
    }

    #[test]
    fn the_manifest_counts() {
        let bytes = wat::parse_str(module(["a", "b", "c"], 7, "x")).expect("WAT");
        let one = fingerprint(&bytes, br#"{"events":["A"]}"#).expect("fingerprint");
        let other = fingerprint(&bytes, br#"{"events":["B"]}"#).expect("fingerprint");
        assert_ne!(one.fingerprint, other.fingerprint);
        assert!(other.fingerprint.to_string().starts_with("v2:"));
        let note = explain_new_view(
            &other,
            Some(("x-1_0_0", &one.fingerprint.to_string(), &one.part_map())),
        );
        assert!(note.contains("differs from x-1_0_0"), "{note}");
        assert!(note.contains("manifest"), "{note}");
        assert!(!note.contains("code"), "{note}");
    }

    #[test]
    fn an_old_scheme_fingerprint_is_never_compared() {
        let one = fp(&module(["a", "b", "c"], 7, "x"));
        let note = explain_new_view(&one, Some(("x-1_0_0", "abcdef", &BTreeMap::new())));
        assert!(note.contains("older kiln"), "{note}");
    }
}

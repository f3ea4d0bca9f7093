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
//!   unrelocated constant, or four unrelocated bytes of data, that happen to
//!   point into data count both as their value and as the object they would
//!   point to.
//! - **Relocations are checked, never trusted** ([`Relocs::new`]): each one
//!   must cover exactly one immediate of an instruction it can relocate (or
//!   a field inside one data object), and that field must decode to what
//!   the tool conventions' Linking.md says for its type: the symbol's
//!   address plus the addend, the function's table slot, the function,
//!   global, table or type index. Every table slot must be the target of a
//!   checked relocation, no `call_indirect` may go through an unrelocated
//!   constant, and elements must be plain function lists at constant
//!   offsets. Any mismatch (a tool that rewrote the code after linking and
//!   kept the relocation sections, a hand-made module) and the whole module
//!   is hashed as laid out, as it is without relocations or when they do
//!   not account for the data (data outside every symbol, a section without
//!   relocations): a rebuild may then look changed (a replay), never the
//!   other way round.
//! - Everything else (types, imports, memory, globals, constants) is hashed
//!   as it is; custom sections (names, producers, debug info) are ignored,
//!   and the manifest counts with every field but its version.
//!
//! What stays trusted: that the linker relocated every address and every
//! function pointer it wrote (it writes one relocation for each), and that
//! the code does not depend on where the linker put an object or a function
//! (the order of data objects and table slots); both hold for what rustc and
//! wasm-ld produce. Scheme `v3` (issue 26) differs from `v2` in the manifest
//! (`per_stream` counts) and the checks; fingerprints of another scheme are
//! never compared.
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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::ops::Range;

use wasmparser::{
    BinaryReader, BlockType, CompositeInnerType, ConstExpr, DataKind, ElementItems, ElementKind,
    ExternalKind, KnownCustom, Linking, Operator, Parser, Payload, RefType, RelocationType,
    SymbolInfo, TableInit, TypeRef, ValType, WasmFeatures,
};

/// The fingerprint scheme; stored fingerprints carry it as a prefix, so a
/// fingerprint computed by another scheme never equals one of this scheme.
pub const SCHEME: &str = "v3";

/// A module's identity for "unchanged logic". Displayed as `v3:<hex>`.
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
        "manifest" => {
            "manifest (every field but the version: name, event types, categories, per_stream, ABI)"
        }
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
    /// Where it puts its functions in the table.
    place: Place,
    /// Function indices (a segment of functions).
    funcs: Vec<u32>,
    /// Or expressions (a segment of expressions).
    exprs: Vec<ConstExpr<'a>>,
}

/// Where an element segment puts its functions.
#[derive(Clone, Copy)]
enum Place {
    /// From this slot of the first table on (an active segment of functions
    /// at an `i32.const` offset).
    At(u32),
    /// Nowhere (a declaration for `ref.func`).
    Declared,
    /// Elsewhere, or later (another table, a computed offset, a passive
    /// segment, expressions).
    Other,
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
                        let mut place = Place::Other;
                        match &e.kind {
                            ElementKind::Passive => head.push(0),
                            ElementKind::Declared => {
                                head.push(1);
                                place = Place::Declared;
                            }
                            ElementKind::Active {
                                table_index,
                                offset_expr,
                            } => {
                                head.push(2);
                                head.extend(table_index.unwrap_or(0).to_le_bytes());
                                head.extend(raw(bytes, offset_expr.get_binary_reader()));
                                let mut ops = offset_expr.get_operators_reader();
                                if let (0, Ok(Operator::I32Const { value }), Ok(Operator::End)) =
                                    (table_index.unwrap_or(0), ops.read(), ops.read())
                                {
                                    place = Place::At(value as u32);
                                }
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
                                if !matches!(place, Place::Declared) {
                                    place = Place::Other;
                                }
                                exprs = Vec::new();
                                for expr in r {
                                    exprs.push(expr?);
                                }
                            }
                        }
                        m.elements.push(Element {
                            head,
                            place,
                            funcs,
                            exprs,
                        });
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
        all.update(b"kiln-fingerprint-v3");
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

/// The linker's relocations, resolved to objects and functions, each one
/// checked against the bytes it covers.
struct Relocs {
    objects: Vec<Object>,
    /// (address, end, object) of the objects in active segments, by address.
    by_address: Vec<(u64, u64, usize)>,
    /// Relocated fields in code, by absolute file offset: (field end, target).
    code: BTreeMap<usize, (usize, Target)>,
    /// Relocated fields in data, by (segment, offset): (field end, target).
    data: BTreeMap<(usize, usize), (usize, Target)>,
}

/// A symbol of the linking section, as the relocations use it.
enum Sym {
    Func(u32),
    /// A data symbol: its address (defined in an active segment at a
    /// constant address) and its bytes as an object (when it has any).
    Data {
        address: Option<u64>,
        object: Option<Object>,
    },
    Global(u32),
    Table(u32),
    Other,
}

/// One relocation as read: its field (absolute file offsets), its type, the
/// value the field must hold (`None`: an undefined symbol, so nothing to
/// check; its target is then [`Target::Raw`], the field hashed as it is),
/// and what it refers to.
struct Reloc {
    field: Range<usize>,
    ty: RelocationType,
    expect: Option<u64>,
    target: Target,
}

impl Relocs {
    /// Reads the relocations and checks each against the bytes it covers, or
    /// says why the module's layout cannot be accounted for by them.
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
        let mut symbols = Vec::new();
        for sub in reader.subsections() {
            if let Linking::SymbolTable(table) = sub.map_err(bad)? {
                for sym in table {
                    symbols.push(match sym.map_err(bad)? {
                        SymbolInfo::Func { index, .. } => Sym::Func(index),
                        SymbolInfo::Data {
                            symbol: Some(d), ..
                        } => {
                            let address = m
                                .data
                                .get(d.index as usize)
                                .and_then(|s| s.address)
                                .map(|a| u64::from(a) + u64::from(d.offset));
                            Sym::Data {
                                address,
                                object: (d.size > 0).then_some(Object {
                                    segment: d.index as usize,
                                    offset: d.offset as usize,
                                    size: d.size as usize,
                                }),
                            }
                        }
                        SymbolInfo::Data { symbol: None, .. } => Sym::Data {
                            address: None,
                            object: None,
                        },
                        SymbolInfo::Global { index, .. } => Sym::Global(index),
                        SymbolInfo::Table { index, .. } => Sym::Table(index),
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
                Sym::Data {
                    object: Some(o), ..
                } => Some(*o),
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
        // The object holding `o` and `o`'s offset in it.
        let object_of = |segment: usize, offset: usize| -> Option<(usize, usize)> {
            let i = objects
                .partition_point(|x| (x.segment, x.offset) <= (segment, offset))
                .checked_sub(1)?;
            let o = &objects[i];
            (o.segment == segment && offset < o.offset + o.size).then(|| (i, offset - o.offset))
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
        let slots = m.table_slots()?;

        // The relocations of the code and data sections (those of custom
        // sections, debug info, do not matter: custom sections are not hashed).
        let mut code_fields: BTreeMap<usize, Reloc> = BTreeMap::new();
        let mut data_fields: BTreeMap<usize, Reloc> = BTreeMap::new();
        let (mut saw_code, mut saw_data) = (false, false);
        for range in &m.reloc_sections {
            let r = wasmparser::RelocSectionReader::new(BinaryReader::new(
                &m.bytes[range.clone()],
                range.start,
            ))
            .map_err(bad)?;
            let section = r.section_index();
            let (fields, payload) = if Some(section) == m.code_index {
                saw_code = true;
                (&mut code_fields, m.code_payload)
            } else if Some(section) == m.data_index {
                saw_data = true;
                (&mut data_fields, m.data_payload)
            } else {
                continue;
            };
            for entry in r.entries() {
                let e = entry.map_err(bad)?;
                let field = e.relocation_range().map_err(bad)?;
                let field = payload + field.start..payload + field.end;
                if field.end > m.bytes.len() {
                    return Err(format!(
                        "a relocation at offset {} runs past the module's end",
                        field.start
                    ));
                }
                let (expect, target) = resolve(&e, &symbols, &slots, &|o: &Object| {
                    object_of(o.segment, o.offset).map(|(i, delta)| (i, delta, objects[i].size))
                })?;
                let at = field.start;
                let reloc = Reloc {
                    field,
                    ty: e.ty,
                    expect,
                    target,
                };
                if fields.insert(at, reloc).is_some() {
                    return Err(format!("two relocations at offset {at}"));
                }
            }
        }
        // The relocations are trusted to list every address in data and
        // every table slot in use (the linker writes one for each), once
        // checked; a module without any for its data or code sections is
        // not taken at its word.
        if !m.data.is_empty() && !saw_data {
            return Err("the module carries no relocations for its data section".into());
        }
        if !m.bodies.is_empty() && !saw_code {
            return Err("the module carries no relocations for its code section".into());
        }
        for fields in [&code_fields, &data_fields] {
            let mut end = 0;
            for r in fields.values() {
                if r.field.start < end {
                    return Err(format!("relocations overlap at offset {}", r.field.start));
                }
                end = r.field.end;
            }
        }
        m.check_code_relocations(&code_fields)?;

        let mut data = BTreeMap::new();
        for r in data_fields.values() {
            let (seg, off) = m
                .segment_at(r.field.start)
                .ok_or("a data relocation lies outside every segment")?;
            // Inside one object: a field elsewhere would not be hashed.
            match object_of(seg, off) {
                Some((o, delta)) if delta + r.field.len() <= objects[o].size => {}
                _ => {
                    return Err(format!(
                        "a data relocation at offset {} lies outside every data symbol",
                        r.field.start
                    ));
                }
            }
            let raw = &m.bytes[r.field.clone()];
            let value = match r.ty {
                RelocationType::MemoryAddrI32 | RelocationType::TableIndexI32 => raw
                    .try_into()
                    .ok()
                    .map(|b| u64::from(u32::from_le_bytes(b))),
                RelocationType::MemoryAddrI64 | RelocationType::TableIndexI64 => {
                    raw.try_into().ok().map(u64::from_le_bytes)
                }
                other => {
                    return Err(format!(
                        "a relocation of type {other:?} in the data section is not supported"
                    ));
                }
            };
            check_value(r, value.map(i128::from))?;
            data.insert((seg, off), (off + r.field.len(), r.target));
        }

        // Every slot of the table must be reached through a checked
        // relocation: a slot only an unrelocated number names would be
        // compared by what it holds, not where it is.
        let referenced: HashSet<u32> = code_fields
            .values()
            .chain(data_fields.values())
            .filter_map(|r| match r.target {
                Target::Slot { func } => Some(func),
                _ => None,
            })
            .collect();
        if let Some((func, slot)) = slots
            .iter()
            .filter(|(f, _)| !referenced.contains(*f))
            .min_by_key(|(_, slot)| **slot)
        {
            return Err(format!(
                "table slot {slot} (function {func}) is referenced by no relocation"
            ));
        }

        let code = code_fields
            .into_iter()
            .map(|(at, r)| (at, (r.field.end, r.target)))
            .collect();
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

/// The object holding a data symbol's range: its index, the symbol's offset
/// in it and the object's size.
type ObjectOf<'a> = dyn Fn(&Object) -> Option<(usize, usize, usize)> + 'a;

/// What relocation `e` says its field holds (per the tool conventions'
/// Linking.md) and what it refers to. `object_of(o)`: the object holding a
/// data symbol's range, the symbol's offset in it and the object's size.
fn resolve(
    e: &wasmparser::RelocationEntry,
    symbols: &[Sym],
    slots: &HashMap<u32, u32>,
    object_of: &ObjectOf<'_>,
) -> Result<(Option<u64>, Target), String> {
    use RelocationType as R;
    let sym = symbols.get(e.index as usize);
    let wrong = |what: &str| {
        Err(format!(
            "a {:?} relocation names symbol {} that is not {what}",
            e.ty, e.index
        ))
    };
    Ok(match e.ty {
        R::MemoryAddrLeb
        | R::MemoryAddrSleb
        | R::MemoryAddrI32
        | R::MemoryAddrLeb64
        | R::MemoryAddrSleb64
        | R::MemoryAddrI64 => {
            let Some(Sym::Data { address, object }) = sym else {
                return wrong("data");
            };
            // The symbol's address plus the addend.
            let expect = address.map(|a| a.wrapping_add(e.addend as u64));
            let target = match (object, expect) {
                (Some(o), Some(_)) => {
                    let (object, delta, size) =
                        object_of(o).ok_or("a data symbol outside every object")?;
                    let addend = delta as i64 + e.addend;
                    // Past its object's end (one past is an end pointer),
                    // an address depends on what the linker put next: it
                    // keeps its value.
                    if (0..=size as i64).contains(&addend) {
                        Target::Memory { object, addend }
                    } else {
                        Target::Raw
                    }
                }
                (Some(_), None) => {
                    return Err(format!(
                        "data symbol {} lies in a segment without a constant address",
                        e.index
                    ));
                }
                (None, _) => Target::Raw,
            };
            (expect, target)
        }
        R::TableIndexSleb | R::TableIndexI32 | R::TableIndexSleb64 | R::TableIndexI64 => {
            let Some(Sym::Func(func)) = sym else {
                return wrong("a function");
            };
            let slot = slots
                .get(func)
                .ok_or_else(|| format!("function {func}'s table relocation has no table slot"))?;
            (Some(u64::from(*slot)), Target::Slot { func: *func })
        }
        R::FunctionIndexLeb => match sym {
            Some(Sym::Func(f)) => (Some(u64::from(*f)), Target::Raw),
            _ => return wrong("a function"),
        },
        R::GlobalIndexLeb => match sym {
            Some(Sym::Global(g)) => (Some(u64::from(*g)), Target::Raw),
            _ => return wrong("a global"),
        },
        R::TableNumberLeb => match sym {
            Some(Sym::Table(t)) => (Some(u64::from(*t)), Target::Raw),
            _ => return wrong("a table"),
        },
        // The index is the type's own, not a symbol's.
        R::TypeIndexLeb => (Some(u64::from(e.index)), Target::Raw),
        other => return Err(format!("relocation type {other:?} is not supported")),
    })
}

/// Does the value a field decodes to (`None`: it does not decode) equal what
/// its relocation says?
fn check_value(r: &Reloc, value: Option<i128>) -> Result<(), String> {
    let Some(expect) = r.expect else {
        return Ok(());
    };
    let wide = matches!(
        r.ty,
        RelocationType::MemoryAddrLeb64
            | RelocationType::MemoryAddrSleb64
            | RelocationType::MemoryAddrI64
            | RelocationType::TableIndexSleb64
            | RelocationType::TableIndexI64
    );
    // A signed field holds the value's two's complement.
    let fits = |v: i128| {
        if wide {
            (v >= i128::from(i64::MIN) && v < 0 && (v as i64 as u64) == expect)
                || v == i128::from(expect)
        } else {
            expect <= u64::from(u32::MAX)
                && ((v >= i128::from(i32::MIN) && v < 0 && u64::from(v as i32 as u32) == expect)
                    || v == i128::from(expect))
        }
    };
    match value {
        Some(v) if fits(v) => Ok(()),
        _ => Err(format!(
            "the field at offset {} does not hold what its {:?} relocation says ({expect})",
            r.field.start, r.ty
        )),
    }
}

/// The value of a LEB128 field that spans exactly `field` (each byte but the
/// last continued), or `None`.
fn leb(field: &[u8], signed: bool) -> Option<i128> {
    let (last, init) = field.split_last()?;
    if last & 0x80 != 0 || init.iter().any(|b| b & 0x80 == 0) || field.len() > 10 {
        return None;
    }
    let mut v: i128 = 0;
    for (i, b) in field.iter().enumerate() {
        v |= i128::from(b & 0x7f) << (7 * i);
    }
    let bits = 7 * field.len();
    if signed && last & 0x40 != 0 {
        v -= 1i128 << bits;
    }
    Some(v)
}

impl ModuleParts<'_> {
    /// The slot of each function placed in the table by an element segment.
    /// Only segments listing functions at a constant offset of the first
    /// table are accounted for; any other placement is layout this module
    /// cannot see through.
    fn table_slots(&self) -> Result<HashMap<u32, u32>, String> {
        let mut by_func = HashMap::new();
        let mut taken = HashSet::new();
        for e in &self.elements {
            let base = match e.place {
                Place::Declared => continue,
                Place::Other => {
                    return Err(
                        "an element segment is not a list of functions at a constant offset".into(),
                    );
                }
                Place::At(base) => base,
            };
            for (i, f) in e.funcs.iter().enumerate() {
                let slot = u32::try_from(i)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .ok_or("an element segment runs past the table's index space")?;
                if !taken.insert(slot) {
                    return Err(format!("table slot {slot} is written twice"));
                }
                if by_func.insert(*f, slot).is_some() {
                    return Err(format!("function {f} sits in two table slots"));
                }
            }
        }
        Ok(by_func)
    }

    /// Checks each relocation of the code section: it covers exactly one
    /// immediate of an instruction it can relocate, which decodes to what the
    /// relocation says. A relocation outside every instruction, or a
    /// `call_indirect` through a constant no relocation covers, fails too.
    fn check_code_relocations(&self, fields: &BTreeMap<usize, Reloc>) -> Result<(), String> {
        let bytes = self.bytes;
        let mut seen = 0;
        for body in &self.bodies {
            let reader =
                wasmparser::FunctionBody::new(BinaryReader::new(&bytes[body.clone()], body.start));
            let unreadable = |e: wasmparser::BinaryReaderError| format!("unreadable code: {e}");
            let mut ops = reader.get_operators_reader().map_err(unreadable)?;
            let mut constant_slot = false;
            while !ops.eof() {
                let (op, at) = ops.read_with_offset().map_err(unreadable)?;
                let end = ops.original_position();
                let mut relocated = false;
                for r in fields.range(at..end).map(|(_, r)| r) {
                    seen += 1;
                    relocated = true;
                    check_code_field(bytes, &op, at, end, r)?;
                }
                if matches!(
                    op,
                    Operator::CallIndirect { .. } | Operator::ReturnCallIndirect { .. }
                ) && constant_slot
                {
                    return Err(format!(
                        "the call_indirect at offset {at} goes through a constant slot no \
                         relocation covers"
                    ));
                }
                constant_slot = matches!(op, Operator::I32Const { .. }) && !relocated;
            }
        }
        if seen != fields.len() {
            return Err(format!(
                "{} of the code section's relocations cover no instruction",
                fields.len() - seen
            ));
        }
        Ok(())
    }
}

/// Checks one relocated field of the instruction `op` at `at..end`.
fn check_code_field(
    bytes: &[u8],
    op: &Operator<'_>,
    at: usize,
    end: usize,
    r: &Reloc,
) -> Result<(), String> {
    use Operator as O;
    use RelocationType as R;
    let f = &r.field;
    // The instruction's only immediate after a one-byte opcode, or its last.
    let whole = f.start == at + 1 && f.end == end;
    let last = f.start > at && f.end == end;
    let placed = match (r.ty, op) {
        (R::MemoryAddrSleb | R::TableIndexSleb, O::I32Const { .. }) => whole,
        (R::MemoryAddrSleb64 | R::TableIndexSleb64, O::I64Const { .. }) => whole,
        (R::MemoryAddrLeb | R::MemoryAddrLeb64, op) => last && memarg_offset(op).is_some(),
        (R::FunctionIndexLeb, O::Call { .. } | O::ReturnCall { .. } | O::RefFunc { .. }) => whole,
        (R::GlobalIndexLeb, O::GlobalGet { .. } | O::GlobalSet { .. }) => whole,
        (R::TypeIndexLeb, O::CallIndirect { .. } | O::ReturnCallIndirect { .. }) => {
            f.start == at + 1 && f.end < end
        }
        (
            R::TypeIndexLeb,
            O::Block {
                blockty: BlockType::FuncType(_),
            }
            | O::Loop {
                blockty: BlockType::FuncType(_),
            }
            | O::If {
                blockty: BlockType::FuncType(_),
            },
        ) => whole,
        (
            R::TableNumberLeb,
            O::CallIndirect { .. }
            | O::ReturnCallIndirect { .. }
            | O::TableGet { .. }
            | O::TableSet { .. }
            | O::TableSize { .. }
            | O::TableGrow { .. }
            | O::TableFill { .. },
        ) => last,
        _ => false,
    };
    // The field starts a LEB128 of its own: the byte before it ends the
    // opcode or the immediate before.
    if !placed || bytes[f.start - 1] & 0x80 != 0 {
        return Err(format!(
            "the {:?} relocation at offset {} covers no immediate it can relocate",
            r.ty, f.start
        ));
    }
    let signed = matches!(
        r.ty,
        R::MemoryAddrSleb | R::TableIndexSleb | R::MemoryAddrSleb64 | R::TableIndexSleb64
    );
    check_value(r, leb(&bytes[f.clone()], signed))
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
            self.unrelocated(r, bytes, from..start.max(from), out);
            self.target(target, &bytes[start..field_end.min(bytes.len())], out);
            from = field_end.max(from);
        }
        self.unrelocated(r, bytes, from.min(end)..end, out);
    }

    /// Bytes of an object no relocation covers: as they are, and, like an
    /// unrelocated constant in code, each four bytes that read as an address
    /// in the data count as the object they would point to too.
    fn unrelocated(&mut self, r: &Relocs, bytes: &[u8], range: Range<usize>, out: &mut Part) {
        out.chunk(&bytes[range.clone()]);
        for at in range.start..range.end.saturating_sub(3) {
            let word = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            if let Some((object, offset)) = r.object_at(u64::from(word)) {
                out.bytes(&((at - range.start) as u64).to_le_bytes());
                self.target(
                    Target::Memory {
                        object,
                        addend: offset,
                    },
                    &[],
                    out,
                );
            }
        }
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
    /// relocations, slots are layout (every slot is the target of a checked
    /// relocation, which counts as the function it holds), so a segment's
    /// functions count as a set; without, in slot order.
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
                 at another version may then look changed. For Rust, build with --emit-relocs \
                 (the build.rs `kiln new` writes, see docs/projections.md); an AssemblyScript module \
                 needs nothing: its version lives only in the manifest, so a version bump \
                 alone aliases"
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
        assert!(other.fingerprint.to_string().starts_with("v3:"));
        let note = explain_new_view(
            &other,
            Some(("x-1_0_0", &one.fingerprint.to_string(), &one.part_map())),
        );
        assert!(note.contains("differs from x-1_0_0"), "{note}");
        assert!(note.contains("manifest"), "{note}");
        assert!(!note.contains("code"), "{note}");
    }

    fn leb(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn sleb(out: &mut Vec<u8>, mut v: i64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0) {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn name(out: &mut Vec<u8>, s: &str) {
        leb(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }

    /// `bytes` with a custom section appended.
    fn custom(bytes: &mut Vec<u8>, section: &str, content: &[u8]) {
        let mut body = Vec::new();
        name(&mut body, section);
        body.extend_from_slice(content);
        bytes.push(0);
        leb(bytes, body.len() as u64);
        bytes.extend_from_slice(&body);
    }

    /// Index (custom sections counted) and payload start of the code and
    /// data sections.
    fn sections(bytes: &[u8]) -> ((u32, usize), Option<(u32, usize)>) {
        let (mut index, mut code, mut data) = (0, None, None);
        for p in Parser::new(0).parse_all(bytes) {
            let p = p.expect("parses");
            match &p {
                Payload::CodeSectionStart { range, .. } => code = Some((index, range.start)),
                Payload::DataSection(r) => data = Some((index, r.range().start)),
                _ => {}
            }
            if p.as_section().is_some() {
                index += 1;
            }
        }
        (code.expect("a code section"), data)
    }

    /// The module the issue describes: a `linking` section and an empty
    /// `reloc.CODE`, one `call_indirect` whose slot comes from `slot`, and
    /// the table's two slots holding `elems`.
    fn claimed_relocations(elems: &str, slot: &str) -> Vec<u8> {
        let mut bytes = wat::parse_str(format!(
            r#"(module
                (type $t (func (result i32)))
                (table 2 funcref)
                (elem (i32.const 0) func {elems})
                (func $f (result i32) (i32.const 1))
                (func $g (result i32) (i32.const 2))
                (func (export "kiln_apply") (param i32) (result i32)
                    (call_indirect (type $t) {slot})))"#
        ))
        .expect("test WAT");
        let ((code, _), _) = sections(&bytes);
        custom(&mut bytes, "linking", &[2]);
        empty_relocations(&mut bytes, "reloc.CODE", code);
        bytes
    }

    /// Appends relocation section `name` for section `index`, with no entry.
    fn empty_relocations(bytes: &mut Vec<u8>, name: &str, index: u32) {
        let mut reloc = Vec::new();
        leb(&mut reloc, u64::from(index));
        leb(&mut reloc, 0);
        custom(bytes, name, &reloc);
    }

    #[test]
    fn table_slots_in_another_order_under_empty_relocations_never_alias() {
        for slot in ["(local.get 0)", "(i32.const 0)"] {
            let one = fp_bytes(&claimed_relocations("$f $g", slot));
            let other = fp_bytes(&claimed_relocations("$g $f", slot));
            assert_ne!(one.fingerprint, other.fingerprint, "slot from {slot}");
            for r in [&one, &other] {
                assert!(matches!(r.form, Form::LaidOut { .. }), "{:?}", r.form);
            }
        }
    }

    fn fp_bytes(bytes: &[u8]) -> FingerprintReport {
        fingerprint(bytes, b"{}").expect("fingerprint")
    }

    /// Two data objects at 0x1000_0000 (so that an `i32.const` of their
    /// addresses takes the five bytes a relocation covers), `first` then
    /// `second` or the other way round, the code reading `value` relocated
    /// as `symbol` (0: "first", 1: "second") plus `addend`.
    fn relocated(swapped: bool, value: i32, symbol: u64, addend: i64) -> Vec<u8> {
        const BASE: u32 = 0x1000_0000;
        let (a, b) = ("first", "second!");
        let data = if swapped {
            format!("{b}\0{a}")
        } else {
            format!("{a}\0{b}")
        };
        // Where each symbol is in the segment.
        let (off_a, off_b) = if swapped {
            (b.len() + 1, 0)
        } else {
            (0, a.len() + 1)
        };
        let mut bytes = wat::parse_str(format!(
            r#"(module
                (memory 4097)
                (func (export "kiln_apply") (param i32) (result i32)
                    (i32.load8_u (i32.const {value})))
                (data (i32.const {BASE}) "{}"))"#,
            data.replace('\0', "\\00")
        ))
        .expect("test WAT");
        let ((code, code_at), data_section) = sections(&bytes);
        let (data, _) = data_section.expect("a data section");
        // Where the constant's five bytes are, from the code section's start.
        let field = {
            let mut found = None;
            for p in Parser::new(0).parse_all(&bytes) {
                if let Payload::CodeSectionEntry(body) = p.expect("parses") {
                    let mut ops = body.get_operators_reader().expect("body");
                    while !ops.eof() {
                        let (op, at) = ops.read_with_offset().expect("op");
                        if let Operator::I32Const { value: v } = op
                            && v == value
                        {
                            found = Some(at + 1 - code_at);
                        }
                    }
                }
            }
            found.expect("the constant")
        };
        let mut linking = vec![2, 8];
        let mut table = Vec::new();
        leb(&mut table, 2);
        for (n, off, size) in [("first", off_a, a.len()), ("second", off_b, b.len())] {
            table.extend([1, 0]);
            name(&mut table, n);
            leb(&mut table, 0);
            leb(&mut table, off as u64);
            leb(&mut table, size as u64);
        }
        leb(&mut linking, table.len() as u64);
        linking.extend(table);
        custom(&mut bytes, "linking", &linking);
        let mut reloc = Vec::new();
        leb(&mut reloc, u64::from(code));
        leb(&mut reloc, 1);
        reloc.push(4); // R_WASM_MEMORY_ADDR_SLEB
        leb(&mut reloc, field as u64);
        leb(&mut reloc, symbol);
        sleb(&mut reloc, addend);
        custom(&mut bytes, "reloc.CODE", &reloc);
        empty_relocations(&mut bytes, "reloc.DATA", data);
        bytes
    }

    #[test]
    fn a_checked_relocation_sees_through_the_data_layout() {
        // "second!" + 2, wherever the linker put it.
        let one = fp_bytes(&relocated(false, 0x1000_0000 + 6 + 2, 1, 2));
        let other = fp_bytes(&relocated(true, 0x1000_0000 + 2, 1, 2));
        assert_eq!(one.form, Form::Relocated);
        assert_eq!(one.fingerprint, other.fingerprint);
        // The other object at the same offset is other logic.
        let first = fp_bytes(&relocated(false, 0x1000_0000 + 2, 0, 2));
        assert_eq!(first.form, Form::Relocated);
        assert_ne!(one.fingerprint, first.fingerprint);
    }

    #[test]
    fn a_relocation_its_field_contradicts_makes_the_module_laid_out() {
        // The field reads "first" + 2 where the relocation says "second!" + 2.
        let lying = fp_bytes(&relocated(true, 0x1000_0000 + 8 + 2, 1, 2));
        let Form::LaidOut { reason } = &lying.form else {
            panic!("{:?}", lying.form)
        };
        assert!(reason.contains("does not hold"), "{reason}");
        let honest = fp_bytes(&relocated(true, 0x1000_0000 + 2, 1, 2));
        assert_ne!(lying.fingerprint, honest.fingerprint);
        // The relocation's addend off by one.
        let off = fp_bytes(&relocated(true, 0x1000_0000 + 2, 1, 3));
        assert!(matches!(off.form, Form::LaidOut { .. }), "{:?}", off.form);
    }

    #[test]
    fn a_laid_out_module_is_told_what_to_do_in_its_language() {
        let note = fp(&module(["a", "b", "c"], 7, "x")).form.describe();
        assert!(note.contains("--emit-relocs"), "{note}");
        assert!(
            note.contains("an AssemblyScript module needs nothing"),
            "{note}"
        );
    }

    #[test]
    fn an_old_scheme_fingerprint_is_never_compared() {
        let one = fp(&module(["a", "b", "c"], 7, "x"));
        let note = explain_new_view(&one, Some(("x-1_0_0", "abcdef", &BTreeMap::new())));
        assert!(note.contains("older kiln"), "{note}");
    }
}

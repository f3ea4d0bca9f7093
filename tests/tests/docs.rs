//! The manual stays honest: what the README and `docs/` say is checked
//! against the files they point to and against the binary they describe.
//!
//! - Every relative link in the Markdown documents (README.md, `docs/`,
//!   `deploy/`, ARCHITECTURE.md, BENCHMARKS.md, the SDKs' READMEs) resolves
//!   to a file, and an anchor to a heading of it by GitHub's slug rules.
//! - Every `kiln <subcommand> … --flag` the documents name, in code blocks and
//!   inline code, is a subcommand of the real binary with those flags in its
//!   `--help`.
//! - `docs/configuration.md` documents every key of `kiln.example.toml`
//!   (commented-out ones too) and no key the file lacks, every flag of
//!   `kiln serve --help`, every variable any `--help` names and every `KILN_*`
//!   variable the daemon's source reads; the variables the tests read are in
//!   it or in `docs/testing.md`.
//!
//! Each failure names the file, the line and what is broken.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use kiln_tests::daemon::kiln_bin;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// The Markdown files that make up the manual, relative to the root.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut docs: Vec<PathBuf> = [
        "README.md",
        "ARCHITECTURE.md",
        "BENCHMARKS.md",
        "sdk/README.md",
        "sdk/ABI.md",
        "sdk-as/README.md",
        "projections/README.md",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| root.join(p).exists())
    .collect();
    for dir in ["docs", "deploy"] {
        markdown_under(&root, Path::new(dir), &mut docs);
    }
    docs.sort();
    docs
}

fn markdown_under(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let rel = dir.join(entry.file_name());
        if entry.path().is_dir() {
            markdown_under(root, &rel, out);
        } else if rel.extension().is_some_and(|e| e == "md") {
            out.push(rel);
        }
    }
}

// ---------------------------------------------------------------------------
// A small Markdown reader: fenced code, inline code, links, headings.

/// A Markdown file split into what the checks read.
struct Markdown {
    /// The text outside fenced code blocks; their lines are left empty, so
    /// offsets still give line numbers.
    prose: String,
    /// Lines inside fenced code blocks, with their 1-based numbers.
    code_lines: Vec<(usize, String)>,
    /// Inline code spans of the prose: (start offset, content).
    spans: Vec<(usize, String)>,
}

impl Markdown {
    fn read(rel: &Path) -> Markdown {
        let text = std::fs::read_to_string(root().join(rel))
            .unwrap_or_else(|e| panic!("reading {}: {e}", rel.display()));
        let mut prose = String::with_capacity(text.len());
        let mut code_lines = Vec::new();
        let mut fence: Option<(char, usize)> = None;
        for (i, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            let run = |c: char| trimmed.chars().take_while(|&x| x == c).count();
            match fence {
                None if run('`') >= 3 || run('~') >= 3 => {
                    let c = trimmed.chars().next().unwrap();
                    fence = Some((c, run(c)));
                }
                Some((c, n)) if run(c) >= n && trimmed.trim_start_matches(c).trim().is_empty() => {
                    fence = None;
                }
                Some(_) => code_lines.push((i + 1, line.to_string())),
                None => prose.push_str(line),
            }
            prose.push('\n');
        }
        let spans = code_spans(&prose);
        Markdown {
            prose,
            code_lines,
            spans,
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.prose[..offset].matches('\n').count() + 1
    }

    /// The prose with inline code blanked out (newlines kept).
    fn prose_without_code(&self) -> String {
        let mut out = self.prose.clone().into_bytes();
        let bytes = self.prose.as_bytes();
        for (start, end) in code_span_ranges(&self.prose) {
            for (i, b) in out.iter_mut().enumerate().take(end).skip(start) {
                if bytes[i] != b'\n' {
                    *b = b' ';
                }
            }
        }
        String::from_utf8(out).expect("blanking ASCII keeps UTF-8 valid")
    }

    /// Every piece of code in the file: code block lines and inline code
    /// spans, each with its line number.
    fn code(&self) -> Vec<(usize, String)> {
        let mut all = self.code_lines.clone();
        all.extend(
            self.spans
                .iter()
                .map(|(o, s)| (self.line_of(*o), s.clone())),
        );
        all
    }

    /// The anchors GitHub gives this file's headings (and explicit
    /// `<a name>`/`id` anchors).
    fn anchors(&self) -> BTreeSet<String> {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut anchors = BTreeSet::new();
        for line in self.prose.lines() {
            let trimmed = line.trim_start();
            let hashes = trimmed.chars().take_while(|&c| c == '#').count();
            if (1..=6).contains(&hashes) && trimmed[hashes..].starts_with([' ', '\t']) {
                let title = trimmed[hashes..].trim().trim_end_matches('#').trim();
                let slug = slug(title);
                let n = seen.entry(slug.clone()).or_insert(0);
                anchors.insert(if *n == 0 {
                    slug.clone()
                } else {
                    format!("{slug}-{n}")
                });
                *n += 1;
            }
            for attr in ["name=\"", "id=\""] {
                let mut rest = line;
                while let Some(i) = rest.find(attr) {
                    rest = &rest[i + attr.len()..];
                    if let Some(end) = rest.find('"') {
                        anchors.insert(rest[..end].to_string());
                    }
                }
            }
        }
        anchors
    }

    /// Every link target in the prose (outside code), with its line:
    /// `[text](target)`, `<a href="target">` and `[label]: target`.
    fn links(&self) -> Vec<(usize, String)> {
        let prose = self.prose_without_code();
        let mut links = Vec::new();
        let mut from = 0;
        while let Some(i) = prose[from..].find("](") {
            let start = from + i + 2;
            let end = prose[start..]
                .find([')', ' ', '\n'])
                .map_or(prose.len(), |e| start + e);
            links.push((self.line_of(start), prose[start..end].to_string()));
            from = end;
        }
        from = 0;
        while let Some(i) = prose[from..].find("href=\"") {
            let start = from + i + 6;
            let end = prose[start..].find('"').map_or(prose.len(), |e| start + e);
            links.push((self.line_of(start), prose[start..end].to_string()));
            from = end;
        }
        let mut offset = 0;
        for line in prose.split_inclusive('\n') {
            let t = line.trim_start();
            if t.starts_with('[')
                && let Some(close) = t.find("]:")
                && !t[1..close].contains(']')
            {
                let target = t[close + 2..].split_whitespace().next().unwrap_or("");
                links.push((self.line_of(offset), target.to_string()));
            }
            offset += line.len();
        }
        links
    }
}

/// The byte ranges of the inline code spans in `prose` (backticks included):
/// a run of n backticks up to the next run of exactly n, within a paragraph.
fn code_span_ranges(prose: &str) -> Vec<(usize, usize)> {
    let bytes = prose.as_bytes();
    let run_at = |i: usize| bytes[i..].iter().take_while(|&&b| b == b'`').count();
    let mut ranges = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let n = run_at(i);
        let mut j = i + n;
        let mut close = None;
        while j < bytes.len() {
            if bytes[j] == b'`' {
                let m = run_at(j);
                if m == n {
                    close = Some(j);
                    break;
                }
                j += m;
            } else if bytes[j] == b'\n'
                && prose[j + 1..]
                    .trim_start_matches([' ', '\t'])
                    .starts_with('\n')
            {
                break;
            } else {
                j += 1;
            }
        }
        match close {
            Some(c) => {
                ranges.push((i, c + n));
                i = c + n;
            }
            None => i += n,
        }
    }
    ranges
}

/// The inline code spans of `prose`: (start offset, content), line breaks as
/// spaces.
fn code_spans(prose: &str) -> Vec<(usize, String)> {
    code_span_ranges(prose)
        .into_iter()
        .map(|(start, end)| {
            let n = prose[start..].bytes().take_while(|&b| b == b'`').count();
            let inner = prose[start + n..end - n].replace('\n', " ");
            (start, inner.trim().to_string())
        })
        .collect()
}

/// GitHub's anchor for a heading: the rendered text (link text, no tags),
/// lowercased, without punctuation but `-` and `_`, spaces as `-`.
fn slug(title: &str) -> String {
    let mut text = String::new();
    let mut rest = title;
    // [text](url) renders as text.
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](").map(|m| open + m) else {
            break;
        };
        let Some(close) = rest[mid..].find(')').map(|c| mid + c) else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..mid]);
        rest = &rest[close + 1..];
    }
    text.push_str(rest);
    // HTML tags render as nothing.
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' if !in_tag => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => plain.push(c),
            _ => {}
        }
    }
    plain
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn slugs_follow_github() {
    assert_eq!(
        slug("What would a cutover change? `kiln diff`"),
        "what-would-a-cutover-change-kiln-diff"
    );
    assert_eq!(
        slug("Blue-green: deploy v2, watch it warm, promote, roll back"),
        "blue-green-deploy-v2-watch-it-warm-promote-roll-back"
    );
    assert_eq!(
        slug("Store core — `kiln bench store`"),
        "store-core--kiln-bench-store"
    );
    assert_eq!(
        slug("`per_stream` is [checked](x.md)"),
        "per_stream-is-checked"
    );
    let md = Markdown {
        prose: "# A\n## A\n\n\n\n## a\n".to_string(),
        code_lines: vec![],
        spans: vec![],
    };
    let anchors: Vec<_> = md.anchors().into_iter().collect();
    assert_eq!(anchors, ["a", "a-1", "a-2"]);
}

// ---------------------------------------------------------------------------
// 1. Links.

#[test]
fn every_relative_link_resolves_to_a_file_and_anchor() {
    let root = root();
    let mut anchors: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    let mut anchors_of = |rel: &Path| {
        anchors
            .entry(rel.to_path_buf())
            .or_insert_with(|| Markdown::read(rel).anchors())
            .clone()
    };
    let mut broken = Vec::new();
    let mut checked = 0;
    for rel in documents() {
        let md = Markdown::read(&rel);
        for (line, target) in md.links() {
            let target = target.trim_matches(['<', '>']);
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target, None),
            };
            let file = file.replace("%20", " ").replace("%5E", "^");
            let target_rel = if file.is_empty() {
                rel.clone()
            } else {
                match normalize(&rel.parent().unwrap_or(Path::new("")).join(&file)) {
                    Some(p) => p,
                    None => {
                        broken.push(format!(
                            "{}:{line}: link `{target}` leaves the repository",
                            rel.display()
                        ));
                        continue;
                    }
                }
            };
            if !root.join(&target_rel).exists() {
                broken.push(format!(
                    "{}:{line}: link `{target}`: no file {}",
                    rel.display(),
                    target_rel.display()
                ));
                continue;
            }
            let Some(anchor) = anchor.filter(|a| !a.is_empty()) else {
                continue;
            };
            if target_rel.extension().is_none_or(|e| e != "md") {
                continue; // e.g. a line of a source file: not ours to check
            }
            let known = anchors_of(&target_rel);
            if !known.contains(anchor) {
                broken.push(format!(
                    "{}:{line}: link `{target}`: {} has no heading with anchor #{anchor}",
                    rel.display(),
                    target_rel.display()
                ));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the reader broken?"
    );
    assert!(
        broken.is_empty(),
        "{} broken links:\n{}",
        broken.len(),
        broken.join("\n")
    );
}

/// `a/../b/./c` → `b/c`; `None` above the root.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// 2. Commands and flags, against the real binary's `--help`.

/// One command of the binary, as its `--help` describes it.
#[derive(Default)]
struct Help {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
    subcommands: BTreeMap<String, Help>,
}

impl Help {
    /// Every variable this command and those under it read.
    fn all_env(&self, out: &mut BTreeSet<String>) {
        out.extend(self.env.iter().cloned());
        for sub in self.subcommands.values() {
            sub.all_env(out);
        }
    }

    /// Every flag of this command and those under it.
    fn all_flags(&self, out: &mut BTreeSet<String>) {
        out.extend(self.flags.iter().cloned());
        for sub in self.subcommands.values() {
            sub.all_flags(out);
        }
    }
}

/// The binary's command tree, read once from `kiln [path] --help`.
fn help() -> &'static Help {
    static HELP: OnceLock<Help> = OnceLock::new();
    HELP.get_or_init(|| read_help(&mut Vec::new()))
}

fn read_help(path: &mut Vec<String>) -> Help {
    let out = Command::new(kiln_bin())
        .args(path.iter())
        .arg("--help")
        .env_remove("KILN_LOG")
        .output()
        .expect("running kiln --help");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`kiln {} --help` failed: {}{}",
        path.join(" "),
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut help = Help::default();
    let mut section = "";
    let mut names = Vec::new();
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        let trimmed = line.trim_start();
        if section == "Commands:" && line.starts_with("  ") && !line.starts_with("   ") {
            if let Some(name) = trimmed.split_whitespace().next()
                && name != "help"
            {
                names.push(name.to_string());
            }
        } else if trimmed.starts_with('-') {
            let spec = trimmed.split("  ").next().unwrap_or("");
            for word in spec.split([' ', ',', '=', '[', ']', '<']) {
                if let Some(flag) = word.strip_prefix("--").filter(|f| !f.is_empty()) {
                    help.flags.insert(flag.to_string());
                }
            }
        }
    }
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut rest = flat.as_str();
    while let Some(i) = rest.find("[env: ") {
        rest = &rest[i + 6..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        help.env.insert(name);
    }
    for name in names {
        path.push(name.clone());
        let sub = read_help(path);
        path.pop();
        help.subcommands.insert(name, sub);
    }
    help
}

/// One `kiln …` command named in a piece of code: its subcommand path and
/// the long flags it names.
#[derive(Debug)]
struct Named {
    words: Vec<String>,
    flags: Vec<String>,
}

/// The `kiln` commands in a line of code. `kiln` counts as the command when
/// it follows the start, a space or a path separator and a space follows it;
/// the command ends at a comment, a pipe, `;` or `&&` outside brackets.
fn named_commands(code: &str) -> Vec<Named> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = code[from..].find("kiln ") {
        let at = from + i;
        from = at + 5;
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '$')) {
            continue;
        }
        let mut named = Named {
            words: Vec::new(),
            flags: Vec::new(),
        };
        let mut depth = 0i32;
        let mut in_words = true;
        for token in code[from..].split_whitespace() {
            let bare = token.replace("\\|", "|");
            if depth <= 0
                && (bare.starts_with('#')
                    || matches!(bare.as_str(), "|" | "||" | "&&" | ";" | ">" | "2>&1"))
            {
                break;
            }
            let opened = token.matches(['[', '(']).count() as i32;
            let closed = token.matches([']', ')']).count() as i32;
            let word = token.trim_start_matches(['[', '(', '"', '\'']);
            if in_words
                && word.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                && !word.starts_with('-')
                && !word.is_empty()
                && depth == 0
            {
                named.words.push(word.to_string());
            } else {
                in_words = false;
                if let Some(flag) = word.strip_prefix("--") {
                    let flag: String = flag
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    if !flag.is_empty() {
                        named.flags.push(flag);
                    }
                }
            }
            depth += opened - closed;
            if token.ends_with([';']) && depth <= 0 {
                break;
            }
        }
        found.push(named);
    }
    found
}

#[test]
fn every_kiln_command_and_flag_the_docs_name_exists() {
    let help = help();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for rel in documents() {
        let md = Markdown::read(&rel);
        for (line, code) in md.code() {
            for named in named_commands(&code) {
                let where_ = format!("{}:{line}", rel.display());
                // Walk the subcommands; words past the last one are arguments.
                let mut cmd = help;
                let mut path = vec!["kiln"];
                let mut unknown = false;
                for word in &named.words {
                    match cmd.subcommands.get(word) {
                        Some(sub) => {
                            cmd = sub;
                            path.push(word.as_str());
                        }
                        None if cmd.subcommands.is_empty() => break,
                        None => {
                            wrong.push(format!(
                                "{where_}: `{}` has no subcommand `{word}` (in `{code}`)",
                                path.join(" ")
                            ));
                            unknown = true;
                            break;
                        }
                    }
                }
                if unknown || (named.words.is_empty() && named.flags.is_empty()) {
                    continue; // reported, or `kiln <cmd>`: a placeholder
                }
                checked += 1;
                let path = path.join(" ");
                for flag in &named.flags {
                    if flag != "help" && !cmd.flags.contains(flag) {
                        wrong.push(format!(
                            "{where_}: `{path}` has no flag --{flag} (see `{path} --help`; in `{code}`)"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} kiln commands found: is the reader broken?"
    );
    assert!(
        wrong.is_empty(),
        "{} commands or flags the docs name do not exist:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 3. docs/configuration.md against kiln.example.toml, --help and the source.

/// Every table and key of `kiln.example.toml`, as dotted paths, with the
/// line that defines it: the TOML the file sets, and the tables and keys it
/// shows commented out (`# [jetstream.tls]`, `# ops_listen = "…"`).
fn example_keys() -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(root().join("kiln.example.toml")).unwrap();
    let parsed: toml::Table = text.parse().expect("kiln.example.toml parses");
    let mut set = BTreeSet::new();
    fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if let toml::Value::Table(t) = v {
                walk(&path, t, out);
            }
            out.insert(path);
        }
    }
    walk("", &parsed, &mut set);
    // Line numbers, and the commented-out keys, from a line reading.
    let mut keys = BTreeMap::new();
    let mut table = String::new();
    let is_key = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|seg| {
                !seg.is_empty()
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
    };
    for (i, line) in text.lines().enumerate() {
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line.trim()),
        };
        if let Some(name) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
            if is_key(name) {
                table = name.to_string();
                keys.entry(name.to_string()).or_insert(i + 1);
            }
            continue;
        }
        let Some((key, value)) = body.split_once(" = ") else {
            continue;
        };
        if !is_key(key) || (commented && format!("{key} = {value}").parse::<toml::Table>().is_err())
        {
            continue;
        }
        let path = if table.is_empty() {
            key.to_string()
        } else {
            format!("{table}.{key}")
        };
        keys.entry(path).or_insert(i + 1);
    }
    for key in &set {
        assert!(
            keys.contains_key(key),
            "kiln.example.toml: the line reading missed `{key}`"
        );
    }
    keys
}

/// Whether a documented key path (`views.<name>.cutover`) names `key`
/// (`views.users.cutover`); with `prefix`, whether it lies under it.
fn names_key(documented: &str, key: &str, prefix: bool) -> bool {
    let d: Vec<&str> = documented.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    let len_ok = if prefix {
        d.len() >= k.len()
    } else {
        d.len() == k.len()
    };
    len_ok
        && k.iter()
            .zip(&d)
            .all(|(k, d)| k == d || (d.starts_with('<') && d.ends_with('>')))
}

/// The code tokens of a document: its inline code and code lines split on
/// spaces, `/` and `,`.
fn code_tokens(md: &Markdown) -> Vec<(usize, String)> {
    let mut tokens = Vec::new();
    for (line, code) in md.code() {
        for t in code.split([' ', '/', ',', '(', ')', '`', '"']) {
            let t = t.trim_matches(['[', ']', ':', ';', '.']);
            if !t.is_empty() {
                tokens.push((line, t.to_string()));
            }
        }
    }
    tokens
}

/// `KILN_X` from a token (`KILN_X=…`, `$KILN_X`), if it names one.
fn variable(token: &str) -> Option<String> {
    let at = token.find("KILN_")?;
    let name: String = token[at..]
        .chars()
        .take_while(|c| {
            c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_' || *c == '<' || *c == '>'
        })
        .collect();
    (name.len() > 5).then_some(name)
}

/// Whether a documented variable (`KILN_WASM_<NAME>`) names `var`.
fn names_variable(documented: &str, var: &str) -> bool {
    match documented.find('<') {
        Some(i) => var.starts_with(&documented[..i]),
        None => documented == var,
    }
}

/// Every `"KILN_…"` string literal in the Rust files under `dir`.
fn variables_in_source(dir: &Path, skip: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            variables_in_source(&path, skip, out);
        } else if path.extension().is_some_and(|e| e == "rs") && path != skip {
            let text = std::fs::read_to_string(&path).unwrap();
            for piece in text.split("\"KILN_").skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.is_empty() && piece[name.len()..].starts_with('"') {
                    out.insert(format!("KILN_{name}"));
                }
            }
        }
    }
}

#[test]
fn configuration_md_documents_every_key_flag_and_variable() {
    let root = root();
    let config = Markdown::read(Path::new("docs/configuration.md"));
    let testing = Markdown::read(Path::new("docs/testing.md"));
    let mut wrong = Vec::new();

    // Keys: the first cell of every table row, each code span a key path.
    let mut documented: Vec<(usize, String)> = Vec::new();
    let mut offset = 0;
    for line in config.prose.split_inclusive('\n') {
        if let Some(row) = line.trim_start().strip_prefix('|') {
            let cell_end = offset
                + (line.len() - line.trim_start().len())
                + 1
                + row.find('|').unwrap_or(row.len());
            for (start, span) in &config.spans {
                let key = span.trim_start_matches('[').trim_end_matches(']');
                if (offset..cell_end).contains(start)
                    && !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.<>".contains(c))
                {
                    documented.push((config.line_of(*start), key.to_string()));
                }
            }
        }
        offset += line.len();
    }
    let example = example_keys();
    for (key, line) in &example {
        let is_table = example.keys().any(|k| k.starts_with(&format!("{key}.")));
        if !documented.iter().any(|(_, d)| names_key(d, key, is_table)) {
            wrong.push(format!(
                "kiln.example.toml:{line}: `{key}` is not in the first column of a table in docs/configuration.md"
            ));
        }
    }
    for (line, d) in &documented {
        if !example.keys().any(|k| names_key(d, k, false)) {
            wrong.push(format!(
                "docs/configuration.md:{line}: `{d}` is not a key of kiln.example.toml"
            ));
        }
    }

    // Flags and variables.
    let help = help();
    let tokens = code_tokens(&config);
    let doc_flags: BTreeSet<String> = tokens
        .iter()
        .filter_map(|(_, t)| t.strip_prefix("--"))
        .map(|f| {
            f.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect()
        })
        .collect();
    let doc_vars: Vec<(usize, String)> = tokens
        .iter()
        .filter_map(|(l, t)| variable(t).map(|v| (*l, v)))
        .collect();
    let serve = &help.subcommands["serve"];
    for flag in &serve.flags {
        if !matches!(flag.as_str(), "help" | "version") && !doc_flags.contains(flag) {
            wrong.push(format!(
                "`kiln serve --help`: --{flag} is not in docs/configuration.md"
            ));
        }
    }
    let mut all_flags = BTreeSet::new();
    help.all_flags(&mut all_flags);
    for (line, token) in &tokens {
        if let Some(flag) = token.strip_prefix("--") {
            let flag: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !flag.is_empty() && !all_flags.contains(&flag) {
                wrong.push(format!(
                    "docs/configuration.md:{line}: --{flag} is a flag of no kiln command"
                ));
            }
        }
    }
    let mut read = BTreeSet::new();
    help.all_env(&mut read);
    let mut in_help = read.clone();
    variables_in_source(&root.join("daemon/src"), Path::new(""), &mut read);
    for var in &read {
        if !doc_vars.iter().any(|(_, d)| names_variable(d, var)) {
            let source = if in_help.contains(var) {
                "named by a --help"
            } else {
                "read by daemon/src"
            };
            wrong.push(format!("{var} ({source}) is not in docs/configuration.md"));
        }
    }
    in_help.extend(read.iter().cloned());
    for (line, d) in &doc_vars {
        if !in_help.iter().any(|v| names_variable(d, v)) {
            wrong.push(format!(
                "docs/configuration.md:{line}: {d} is read by no kiln command (test-only variables go to docs/testing.md)"
            ));
        }
    }

    // The variables the tests read: in the testing page (or the daemon's).
    let mut tested = BTreeSet::new();
    let this_file = root.join("tests/tests/docs.rs");
    for dir in ["tests/src", "tests/tests"] {
        variables_in_source(&root.join(dir), &this_file, &mut tested);
    }
    let testing_vars: Vec<String> = code_tokens(&testing)
        .iter()
        .filter_map(|(_, t)| variable(t))
        .chain(doc_vars.iter().map(|(_, v)| v.clone()))
        .collect();
    for var in &tested {
        if !testing_vars.iter().any(|d| names_variable(d, var)) {
            wrong.push(format!(
                "{var} (read by tests/) is in neither docs/testing.md nor docs/configuration.md"
            ));
        }
    }

    assert!(
        example.len() > 80,
        "only {} keys read from kiln.example.toml",
        example.len()
    );
    assert!(
        wrong.is_empty(),
        "{} things docs/configuration.md and what it describes disagree on:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

//! Reading and rewriting a module's `kiln-manifest` custom section without
//! compiling it: how a tool re-versions a module (`users` 1.0.0 → 1.1.0) or
//! changes what it subscribes to. Every other section is copied byte for byte,
//! in order, so the code (and so the fingerprint's code part) is unchanged.

use kiln_sdk::abi::MANIFEST_SECTION;

/// Why a module's sections could not be walked.
#[derive(Debug, thiserror::Error)]
pub enum ManifestEditError {
    #[error("not a WebAssembly module (no \\0asm header)")]
    NotWasm,
    #[error("malformed module: {0}")]
    Malformed(&'static str),
    #[error("the module has no {MANIFEST_SECTION} section")]
    NoManifest,
}

/// The content of `module`'s `kiln-manifest` section (the manifest's JSON).
pub fn manifest_bytes(module: &[u8]) -> Result<&[u8], ManifestEditError> {
    for section in sections(module)? {
        let section = section?;
        if let Some(content) = section.manifest {
            return Ok(content);
        }
    }
    Err(ManifestEditError::NoManifest)
}

/// `module` with its `kiln-manifest` section's content replaced by `manifest`.
pub fn replace_manifest(module: &[u8], manifest: &[u8]) -> Result<Vec<u8>, ManifestEditError> {
    let mut out = Vec::with_capacity(module.len() + manifest.len());
    out.extend_from_slice(&module[..8.min(module.len())]);
    let mut replaced = false;
    for section in sections(module)? {
        let section = section?;
        if section.manifest.is_some() && !replaced {
            let mut body = Vec::with_capacity(manifest.len() + 16);
            write_leb(&mut body, MANIFEST_SECTION.len());
            body.extend_from_slice(MANIFEST_SECTION.as_bytes());
            body.extend_from_slice(manifest);
            out.push(0);
            write_leb(&mut out, body.len());
            out.extend_from_slice(&body);
            replaced = true;
        } else {
            out.extend_from_slice(section.whole);
        }
    }
    if replaced {
        Ok(out)
    } else {
        Err(ManifestEditError::NoManifest)
    }
}

struct Section<'a> {
    /// The section as it is in the module: id, size and body.
    whole: &'a [u8],
    /// The content after the name, when this is the manifest section.
    manifest: Option<&'a [u8]>,
}

fn sections(
    module: &[u8],
) -> Result<impl Iterator<Item = Result<Section<'_>, ManifestEditError>>, ManifestEditError> {
    if module.len() < 8 || !module.starts_with(b"\0asm") {
        return Err(ManifestEditError::NotWasm);
    }
    let mut at = 8;
    Ok(std::iter::from_fn(move || {
        if at >= module.len() {
            return None;
        }
        let next = (|| {
            let id = module[at];
            let (size, body) = read_leb(module, at + 1)?;
            let end = body
                .checked_add(size)
                .filter(|e| *e <= module.len())
                .ok_or(ManifestEditError::Malformed(
                    "a section runs past the end of the module",
                ))?;
            let mut manifest = None;
            if id == 0 {
                let payload = &module[body..end];
                let (name_len, name_at) = read_leb(payload, 0)?;
                let name = payload
                    .get(name_at..name_at.saturating_add(name_len))
                    .ok_or(ManifestEditError::Malformed(
                        "a custom section's name runs past its end",
                    ))?;
                if name == MANIFEST_SECTION.as_bytes() {
                    manifest = Some(&payload[name_at + name_len..]);
                }
            }
            let whole = &module[at..end];
            at = end;
            Ok(Section { whole, manifest })
        })();
        if next.is_err() {
            at = module.len();
        }
        Some(next)
    }))
}

/// An unsigned LEB128 at `at`: (value, offset after it).
fn read_leb(bytes: &[u8], mut at: usize) -> Result<(usize, usize), ManifestEditError> {
    let (mut value, mut shift) = (0usize, 0u32);
    loop {
        let b = *bytes
            .get(at)
            .ok_or(ManifestEditError::Malformed("truncated LEB128"))?;
        if shift >= 35 {
            return Err(ManifestEditError::Malformed("LEB128 too long"));
        }
        at += 1;
        value |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((value, at));
        }
        shift += 7;
    }
}

fn write_leb(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let b = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module with a type section, the manifest and a trailing custom section.
    fn module(manifest: &[u8]) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend_from_slice(&[1, 4, 1, 0x60, 0, 0]); // type section: () -> ()
        let mut body = Vec::new();
        write_leb(&mut body, MANIFEST_SECTION.len());
        body.extend_from_slice(MANIFEST_SECTION.as_bytes());
        body.extend_from_slice(manifest);
        m.push(0);
        write_leb(&mut m, body.len());
        m.extend_from_slice(&body);
        m.extend_from_slice(&[0, 4, 3, b'x', b'y', b'z']);
        m
    }

    #[test]
    fn replaces_only_the_manifest() {
        let long = vec![b'a'; 300]; // a section size needing two LEB bytes
        let original = module(b"{\"v\":1}");
        assert_eq!(manifest_bytes(&original).unwrap(), b"{\"v\":1}");
        let edited = replace_manifest(&original, &long).unwrap();
        assert_eq!(manifest_bytes(&edited).unwrap(), &long[..]);
        assert_eq!(edited, module(&long));
        assert_eq!(replace_manifest(&edited, b"{\"v\":1}").unwrap(), original);
    }

    #[test]
    fn malformed_modules_are_errors() {
        assert!(matches!(
            manifest_bytes(b"nope"),
            Err(ManifestEditError::NotWasm)
        ));
        let mut m = module(b"{}");
        m.truncate(m.len() - 2);
        assert!(matches!(
            replace_manifest(&m, b"{}"),
            Err(ManifestEditError::Malformed(_))
        ));
        let no_manifest = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0";
        assert!(matches!(
            manifest_bytes(no_manifest),
            Err(ManifestEditError::NoManifest)
        ));
    }
}

//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where fields of `struct sock`
//! and `struct tcp_sock` sit on the running kernel, and how many arguments a tracepoint passes.
//!
//! The kernel programs are BTF tracepoints (`tp_btf`): they get the tracepoint's raw arguments (a
//! `struct sock *`, states, lengths) instead of a formatted record, and read the few socket fields
//! they need directly. Rust eBPF has no CO-RE relocations, so the loader looks the offsets up here and
//! hands them to the programs as read-only globals, which the verifier treats as constants. (aya parses
//! BTF too, but does not expose type lookups.)

use std::collections::HashMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Why the kernel's types could not be read or lack what the programs need.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source} (tcplake needs a kernel built with CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no {0}: this kernel is not supported")]
    Missing(String),
    #[error("`{0}` is a bit field on this kernel: not supported")]
    BitField(String),
}

#[derive(Clone, Copy)]
struct Member {
    name: u32,
    ty: u32,
    /// Bit offset (and, with `kind_flag`, the bit-field size in the top 8 bits).
    offset: u32,
}

struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// Size (structs, unions, ints) or referenced type (pointers, typedefs, modifiers).
    size_or_type: u32,
    members: Vec<Member>,
}

/// The parsed type section and its strings.
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    /// Struct, union and typedef ids by name.
    by_name: HashMap<(u32, String), u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("four bytes")))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// The running kernel's types.
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Btf::parse(&data)
    }

    /// Parses raw (little-endian) BTF.
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let tys = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        // Type id 0 is `void`.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            kind_flag: false,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < tys.len() {
            let name = u32_at(tys, at)?;
            let info = u32_at(tys, at + 4)?;
            let size_or_type = u32_at(tys, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        members.push(Member {
                            name: u32_at(tys, m)?,
                            ty: u32_at(tys, m + 4)?,
                            offset: u32_at(tys, m + 8)?,
                        });
                    }
                    vlen * 12
                }
                KIND_FUNC_PROTO => {
                    // Parameters, kept as members without offsets (their count is what we need).
                    for i in 0..vlen {
                        let m = at + i * 8;
                        members.push(Member {
                            name: u32_at(tys, m)?,
                            ty: u32_at(tys, m + 4)?,
                            offset: 0,
                        });
                    }
                    vlen * 8
                }
                KIND_ENUM => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                0..=19 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                kind_flag,
                size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if matches!(t.kind, KIND_STRUCT | KIND_UNION | KIND_TYPEDEF) && t.name != 0 {
                let name = btf.name(t.name).to_string();
                btf.by_name.entry((t.kind, name)).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn get(&self, id: u32) -> Result<&Type, BtfError> {
        self.types
            .get(id as usize)
            .ok_or(BtfError::Malformed("type id out of range"))
    }

    /// Follows typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..32 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::Malformed("type chain too long"))
    }

    /// Byte offset and size of field `path` (`a.b.c`; members of anonymous structs and unions are
    /// found as if they were the parent's) in struct `ty`.
    pub fn field(&self, ty: &str, path: &str) -> Result<(u32, u32), BtfError> {
        let missing = || BtfError::Missing(format!("field {ty}.{path}"));
        let mut id = *self
            .by_name
            .get(&(KIND_STRUCT, ty.to_string()))
            .ok_or_else(|| BtfError::Missing(format!("struct {ty}")))?;
        let mut offset_bits = 0u32;
        for part in path.split('.') {
            let (bits, member) = self.find(id, part)?.ok_or_else(missing)?;
            offset_bits += bits;
            id = self.resolve(member)?;
        }
        if offset_bits % 8 != 0 {
            return Err(BtfError::BitField(format!("{ty}.{path}")));
        }
        Ok((offset_bits / 8, self.size(id)?))
    }

    /// Bit offset and type of member `name` of struct/union `id`, looking into anonymous members.
    fn find(&self, id: u32, name: &str) -> Result<Option<(u32, u32)>, BtfError> {
        let t = self.get(id)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return Ok(None);
        }
        for m in &t.members {
            let (bits, bitfield) = if t.kind_flag {
                (m.offset & 0x00ff_ffff, m.offset >> 24)
            } else {
                (m.offset, 0)
            };
            if m.name != 0 && self.name(m.name) == name {
                if bitfield != 0 {
                    return Err(BtfError::BitField(name.to_string()));
                }
                return Ok(Some((bits, m.ty)));
            }
            if m.name == 0 {
                if let Some((inner, ty)) = self.find(self.resolve(m.ty)?, name)? {
                    return Ok(Some((bits + inner, ty)));
                }
            }
        }
        Ok(None)
    }

    fn size(&self, id: u32) -> Result<u32, BtfError> {
        let t = self.get(id)?;
        Ok(match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => t.size_or_type,
            KIND_PTR => 8,
            KIND_ARRAY => 0,
            _ => 0,
        })
    }

    /// How many arguments tracepoint `name` passes its BTF programs (its `btf_trace_<name>` type, a
    /// pointer to a function whose first parameter is the tracepoint's private data).
    pub fn tracepoint_args(&self, name: &str) -> Result<usize, BtfError> {
        let missing = || BtfError::Missing(format!("tracepoint {name}"));
        let id = *self
            .by_name
            .get(&(KIND_TYPEDEF, format!("btf_trace_{name}")))
            .ok_or_else(missing)?;
        let ptr = self.resolve(id)?;
        let t = self.get(ptr)?;
        if t.kind != KIND_PTR {
            return Err(missing());
        }
        let proto = self.get(self.resolve(t.size_or_type)?)?;
        if proto.kind != KIND_FUNC_PROTO || proto.members.is_empty() {
            return Err(missing());
        }
        Ok(proto.members.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: `struct outer { int a; union { struct { short b; short c; }; int d; }; }`,
    /// a bit field, and a tracepoint typedef with two arguments.
    fn blob() -> Vec<u8> {
        let mut strings = b"\0int\0short\0outer\0a\0b\0c\0d\0bits\0btf_trace_tp\0".to_vec();
        let s = |name: &str, strings: &[u8]| -> u32 {
            let needle = [b"\0", name.as_bytes(), b"\0"].concat();
            strings
                .windows(needle.len())
                .position(|w| w == needle.as_slice())
                .unwrap() as u32
                + 1
        };
        let mut t: Vec<u32> = Vec::new();
        let ty = |t: &mut Vec<u32>, name: u32, kind: u32, vlen: u32, flag: u32, size: u32| {
            t.extend([name, (flag << 31) | (kind << 24) | vlen, size]);
        };
        // 1: int
        ty(&mut t, s("int", &strings), KIND_INT, 0, 0, 4);
        t.push(32);
        // 2: short
        ty(&mut t, s("short", &strings), KIND_INT, 0, 0, 2);
        t.push(16);
        // 3: anonymous struct { short b; short c; }
        ty(&mut t, 0, KIND_STRUCT, 2, 0, 4);
        t.extend([s("b", &strings), 2, 0, s("c", &strings), 2, 16]);
        // 4: anonymous union { struct 3; int d; }
        ty(&mut t, 0, KIND_UNION, 2, 0, 4);
        t.extend([0, 3, 0, s("d", &strings), 1, 0]);
        // 5: struct outer { int a; union 4; int bits:3 }
        ty(&mut t, s("outer", &strings), KIND_STRUCT, 3, 1, 12);
        t.extend([
            s("a", &strings),
            1,
            0,
            0,
            4,
            32,
            s("bits", &strings),
            1,
            (3 << 24) | 64,
        ]);
        // 6: func proto (void *, int, int); 7: pointer to it; 8: typedef btf_trace_tp
        ty(&mut t, 0, KIND_FUNC_PROTO, 3, 0, 0);
        t.extend([0, 0, 0, 1, 0, 1]);
        ty(&mut t, 0, KIND_PTR, 0, 0, 6);
        ty(&mut t, s("btf_trace_tp", &strings), KIND_TYPEDEF, 0, 0, 7);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend(MAGIC.to_le_bytes());
        out.extend([1u8, 0]);
        for v in [24u32, 0, types.len() as u32, types.len() as u32, 0] {
            out.extend(v.to_le_bytes());
        }
        out.truncate(24);
        let str_len = strings.len() as u32;
        out[20..24].copy_from_slice(&str_len.to_le_bytes());
        out.extend(&types);
        out.append(&mut strings);
        out
    }

    #[test]
    fn fields_are_found_through_anonymous_members_and_bit_fields_refused() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.field("outer", "a").unwrap(), (0, 4));
        assert_eq!(btf.field("outer", "b").unwrap(), (4, 2));
        assert_eq!(btf.field("outer", "c").unwrap(), (6, 2));
        assert_eq!(btf.field("outer", "d").unwrap(), (4, 4));
        assert!(matches!(
            btf.field("outer", "bits"),
            Err(BtfError::BitField(_))
        ));
        assert!(matches!(btf.field("outer", "e"), Err(BtfError::Missing(_))));
        assert!(matches!(btf.field("inner", "a"), Err(BtfError::Missing(_))));
        assert_eq!(btf.tracepoint_args("tp").unwrap(), 2);
        assert!(btf.tracepoint_args("other").is_err());
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 0, 0, 0]).is_err());
        let mut b = blob();
        b.truncate(b.len() - 30);
        let _ = Btf::parse(&b);
    }

    /// On a machine with kernel BTF: the fields the programs read exist and are where they should be.
    #[test]
    fn the_running_kernel_has_the_fields_the_programs_read() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no kernel BTF here; skipped");
            return;
        };
        let (family, size) = btf.field("sock", "__sk_common.skc_family").unwrap();
        assert_eq!(size, 2);
        assert!(family < 64);
        assert_eq!(btf.field("sock", "sk_protocol").unwrap().1, 2);
        assert!(btf.field("tcp_sock", "srtt_us").unwrap().0 > 0);
        assert_eq!(btf.tracepoint_args("inet_sock_set_state").unwrap(), 3);
    }
}

//! Tracepoint record layouts, read from tracefs `format` files at load time.
//!
//! The kernel programs read fields at offsets handed to them as globals, so one compiled object works
//! across kernels whose tracepoint structs differ (e.g. `tcp_retransmit_skb` changed on 6.x).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use probe_common::{LengthOffsets, ProbeOffsets, RetransmitOffsets, SetStateOffsets, NO_FIELD};

/// Why a tracepoint's layout could not be learnt.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error(
        "tracefs is not mounted (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing): \
         run `mount -t tracefs tracefs /sys/kernel/tracing` as root"
    )]
    NoTracefs,
    #[error(
        "cannot read tracefs at `{0}`: permission denied; live capture needs root, or CAP_BPF, \
         CAP_PERFMON and CAP_DAC_READ_SEARCH (tracefs is root-only); --source synthetic needs no \
         privileges"
    )]
    Denied(PathBuf),
    #[error("cannot read `{path}`: {source} (is the tracepoint available on this kernel?)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field `{field}`")]
    MissingField {
        tracepoint: String,
        field: &'static str,
    },
    #[error("tracepoint {tracepoint}: field `{field}` is {found} bytes, expected {expected}")]
    FieldSize {
        tracepoint: String,
        field: &'static str,
        found: u32,
        expected: u32,
    },
}

/// Where tracefs is mounted.
pub fn tracefs_root() -> Result<PathBuf, FormatError> {
    for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].map(PathBuf::from) {
        match std::fs::read_dir(root.join("events")) {
            Ok(_) => return Ok(root),
            // Mounted but not ours to read: say so, rather than "not mounted".
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(FormatError::Denied(root))
            }
            Err(_) => {}
        }
    }
    Err(FormatError::NoTracefs)
}

/// The fields of one tracepoint's record: name -> (offset, size).
#[derive(Debug, Default)]
pub struct Format {
    tracepoint: String,
    fields: HashMap<String, (u32, u32)>,
}

impl Format {
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Self, FormatError> {
        let path = root.join("events").join(category).join(name).join("format");
        let text =
            std::fs::read_to_string(&path).map_err(|source| FormatError::Read { path, source })?;
        Ok(Self::parse(&format!("{category}:{name}"), &text))
    }

    /// Parses lines like `field:const void * skaddr;<TAB>offset:8;<TAB>size:8;<TAB>signed:0;`.
    pub fn parse(tracepoint: &str, text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let (mut offset, mut size) = (None, None);
            for part in line.trim().split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                }
            }
            if let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) {
                // The name is the last word of the declaration, without any array suffix.
                let name = decl.split_whitespace().last().unwrap_or_default();
                let name = name
                    .split('[')
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches('*');
                fields.insert(name.to_string(), (offset, size));
            }
        }
        Format {
            tracepoint: tracepoint.to_string(),
            fields,
        }
    }

    /// Offset of a field only some kernels have, or [`NO_FIELD`] when this one does not.
    pub fn optional_offset(&self, field: &'static str, size: u32) -> Result<u32, FormatError> {
        if self.fields.contains_key(field) {
            self.offset(field, size)
        } else {
            Ok(NO_FIELD)
        }
    }

    /// Offset of `field`, checking its size.
    pub fn offset(&self, field: &'static str, size: u32) -> Result<u32, FormatError> {
        let &(offset, found) = self
            .fields
            .get(field)
            .ok_or_else(|| FormatError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field,
            })?;
        if found != size {
            return Err(FormatError::FieldSize {
                tracepoint: self.tracepoint.clone(),
                field,
                found,
                expected: size,
            });
        }
        Ok(offset)
    }
}

pub fn set_state(f: &Format) -> Result<SetStateOffsets, FormatError> {
    Ok(SetStateOffsets {
        skaddr: f.offset("skaddr", 8)?,
        oldstate: f.offset("oldstate", 4)?,
        newstate: f.offset("newstate", 4)?,
        sport: f.offset("sport", 2)?,
        dport: f.offset("dport", 2)?,
        family: f.offset("family", 2)?,
        protocol: f.offset("protocol", 2)?,
        saddr: f.offset("saddr", 4)?,
        daddr: f.offset("daddr", 4)?,
        saddr_v6: f.offset("saddr_v6", 16)?,
        daddr_v6: f.offset("daddr_v6", 16)?,
    })
}

pub fn retransmit(f: &Format) -> Result<RetransmitOffsets, FormatError> {
    Ok(RetransmitOffsets {
        skaddr: f.offset("skaddr", 8)?,
        state: f.offset("state", 4)?,
        sport: f.offset("sport", 2)?,
        dport: f.offset("dport", 2)?,
        family: f.offset("family", 2)?,
        saddr: f.offset("saddr", 4)?,
        daddr: f.offset("daddr", 4)?,
        saddr_v6: f.offset("saddr_v6", 16)?,
        daddr_v6: f.offset("daddr_v6", 16)?,
        err: f.optional_offset("err", 4)?,
    })
}

pub fn probe(f: &Format) -> Result<ProbeOffsets, FormatError> {
    Ok(ProbeOffsets {
        skaddr: f.offset("skaddr", 8)?,
        saddr: f.offset("saddr", 28)?,
        daddr: f.offset("daddr", 28)?,
        sport: f.offset("sport", 2)?,
        dport: f.offset("dport", 2)?,
        family: f.offset("family", 2)?,
        snd_cwnd: f.offset("snd_cwnd", 4)?,
        srtt: f.offset("srtt", 4)?,
    })
}

pub fn length(f: &Format) -> Result<LengthOffsets, FormatError> {
    Ok(LengthOffsets {
        sk: f.offset("sk", 8)?,
        family: f.offset("family", 2)?,
        protocol: f.offset("protocol", 2)?,
        ret: f.offset("ret", 4)?,
        flags: f.offset("flags", 4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tcp:tcp_retransmit_skb` as printed by a 6.18 kernel.
    const RETRANSMIT_6_18: &str = "name: tcp_retransmit_skb
ID: 1405
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;

print fmt: \"skbaddr=%p\", REC->skbaddr
";

    #[test]
    fn parses_a_real_format_file() {
        let f = Format::parse("tcp:tcp_retransmit_skb", RETRANSMIT_6_18);
        let o = retransmit(&f).unwrap();
        assert_eq!((o.skaddr, o.state, o.sport, o.family), (16, 24, 28, 32));
        assert_eq!((o.saddr, o.daddr, o.saddr_v6, o.daddr_v6), (34, 38, 42, 58));
        assert_eq!(o.err, 76);
        // Older kernels have no `err`: the programs are told so instead of reading garbage.
        let old = Format::parse(
            "tcp:tcp_retransmit_skb",
            &RETRANSMIT_6_18.replace("err;", "gone;"),
        );
        assert_eq!(retransmit(&old).unwrap().err, NO_FIELD);
    }

    #[test]
    fn missing_or_resized_fields_are_named() {
        let f = Format::parse("tcp:tcp_retransmit_skb", RETRANSMIT_6_18);
        let e = f.offset("srtt", 4).unwrap_err().to_string();
        assert_eq!(e, "tracepoint tcp:tcp_retransmit_skb has no field `srtt`");
        let e = f.offset("sport", 4).unwrap_err().to_string();
        assert!(e.contains("`sport` is 2 bytes, expected 4"), "{e}");
    }

    #[test]
    fn this_kernels_tracepoints_have_what_the_programs_read() {
        // Runs wherever tracefs is readable (CI and dev machines here); elsewhere there is nothing to check.
        let Ok(root) = tracefs_root() else { return };
        let read = |c, n| Format::read(&root, c, n).unwrap();
        set_state(&read("sock", "inet_sock_set_state")).unwrap();
        retransmit(&read("tcp", "tcp_retransmit_skb")).unwrap();
        probe(&read("tcp", "tcp_probe")).unwrap();
        length(&read("sock", "sock_send_length")).unwrap();
        length(&read("sock", "sock_recv_length")).unwrap();
    }
}

//! TensorBoard scalar event files (`run.tensorboard`): what `tensorboard --logdir runs/` reads.
//!
//! The subset of TensorFlow's event format that scalars need, written here rather than pulling in
//! a protobuf stack: a file of records, each `u64` length, masked CRC-32C of the length, the bytes
//! of one `Event` protocol buffer, masked CRC-32C of those bytes. The first event carries the file
//! version (`brain.Event:2`); every other one a step, a wall time and one `Summary.Value` with a
//! tag and a `simple_value`. [`read_scalars`] reads such files back (the tests use it).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use cim_api::{Error, Result};

/// Appends scalar events to `events.out.tfevents.<unix time>.<host>` in a folder.
#[derive(Debug)]
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates the folder and a new event file in it (one per writer, as TensorFlow does; a
    /// resumed run adds a file and TensorBoard merges them).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "cim".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now.as_secs(),
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = Self {
            file: BufWriter::new(file),
            path,
        };
        let mut ev = vec![];
        field_f64(&mut ev, 1, now.as_secs_f64());
        field_bytes(&mut ev, 3, b"brain.Event:2");
        w.record(&ev)?;
        w.flush()?;
        Ok(w)
    }

    /// One scalar at `step`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        let mut v = vec![];
        field_bytes(&mut v, 1, tag.as_bytes());
        v.push((2 << 3) | 5); // field 2, 32-bit: simple_value
        v.extend_from_slice(&(value as f32).to_le_bytes());
        let mut summary = vec![];
        field_bytes(&mut summary, 1, &v);
        let mut ev = vec![];
        field_f64(&mut ev, 1, wall_time());
        ev.push(2 << 3); // field 2, varint: step
        varint(&mut ev, step);
        field_bytes(&mut ev, 5, &summary);
        self.record(&ev)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut out = Vec::with_capacity(data.len() + 16);
        out.extend_from_slice(&len);
        out.extend_from_slice(&masked_crc(&len).to_le_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file
            .write_all(&out)
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_f64(out: &mut Vec<u8>, field: u8, v: f64) {
    out.push((field << 3) | 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u8, b: &[u8]) {
    out.push((field << 3) | 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// CRC-32C (Castagnoli), a byte at a time with a 256-entry table.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// TensorFlow's masked CRC: rotated right by 15 and offset, so that a CRC stored in data that is
/// itself checksummed does not cancel out.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One scalar of an event file.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub step: u64,
    pub tag: String,
    pub value: f32,
}

/// Reads the scalars of an event file, checking every record's two CRCs. Fields other than the
/// ones [`EventWriter`] writes are skipped, so files of other writers read too.
pub fn read_scalars(path: &Path) -> Result<Vec<Scalar>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::Data {
        path: path.display().to_string(),
        message: m,
    };
    let mut out = vec![];
    let mut at = 0;
    while at < bytes.len() {
        let take = |from: usize, n: usize| {
            bytes
                .get(from..from + n)
                .ok_or_else(|| bad(format!("a record is cut short at byte {from}")))
        };
        let len_b = take(at, 8)?;
        let len = u64::from_le_bytes(len_b.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(take(at + 8, 4)?.try_into().expect("4 bytes"));
        if crc != masked_crc(len_b) {
            return Err(bad(format!("bad length checksum at byte {at}")));
        }
        let data = take(at + 12, len)?;
        let crc = u32::from_le_bytes(take(at + 12 + len, 4)?.try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return Err(bad(format!("bad data checksum at byte {at}")));
        }
        let mut step = 0;
        for (field, value) in fields(data).map_err(&bad)? {
            match (field, value) {
                (2, Field::Varint(s)) => step = s,
                (5, Field::Bytes(summary)) => {
                    for (f, v) in fields(summary).map_err(&bad)? {
                        if let (1, Field::Bytes(value)) = (f, v) {
                            let (mut tag, mut x) = (String::new(), None);
                            for (f, v) in fields(value).map_err(&bad)? {
                                match (f, v) {
                                    (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into(),
                                    (2, Field::Fixed32(b)) => x = Some(f32::from_le_bytes(b)),
                                    _ => {}
                                }
                            }
                            if let Some(value) = x {
                                out.push(Scalar { step, tag, value });
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        at += 16 + len;
    }
    Ok(out)
}

enum Field<'a> {
    Varint(u64),
    Fixed64,
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// The fields of one protocol-buffer message, in order.
fn fields(mut b: &[u8]) -> std::result::Result<Vec<(u64, Field<'_>)>, String> {
    fn var(b: &mut &[u8]) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("a varint is cut short")?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err("a varint is too long".into())
    }
    let mut out = vec![];
    while !b.is_empty() {
        let key = var(&mut b)?;
        let short = || format!("field {} is cut short", key >> 3);
        let field = match key & 7 {
            0 => Field::Varint(var(&mut b)?),
            1 => {
                b = b.get(8..).ok_or_else(short)?;
                Field::Fixed64
            }
            5 => {
                let v: [u8; 4] = b.get(..4).ok_or_else(short)?.try_into().expect("4 bytes");
                b = &b[4..];
                Field::Fixed32(v)
            }
            2 => {
                let n = var(&mut b)? as usize;
                let v = b.get(..n).ok_or_else(short)?;
                b = &b[n..];
                Field::Bytes(v)
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        out.push((key >> 3, field));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 (iSCSI) B.4 and the "123456789" check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn scalars_read_back_with_their_steps_tags_and_values() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path())?;
        w.scalar("loss", 1, 2.5)?;
        w.scalar("phase_ms/data", 1, 0.125)?;
        w.scalar("loss", 300, 1.0e-3)?;
        w.flush()?;
        let got = read_scalars(w.path())?;
        let want = [
            (1, "loss", 2.5),
            (1, "phase_ms/data", 0.125),
            (300, "loss", 1.0e-3),
        ];
        assert_eq!(got.len(), 3);
        for (g, (s, t, v)) in got.iter().zip(want) {
            assert_eq!((g.step, g.tag.as_str(), g.value), (s, t, v as f32));
        }
        // A flipped byte is caught by the checksums.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(w.path(), &bytes).unwrap();
        let e = read_scalars(w.path()).err().unwrap().to_string();
        assert!(e.contains("checksum"), "{e}");
        Ok(())
    }
}

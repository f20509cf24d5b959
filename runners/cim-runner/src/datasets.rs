//! `cim-run data get NAME`: the data sets the presets read, downloaded from their publishers,
//! checked against the publishers' checksums and unpacked to the layout [`crate::data`] reads.
//!
//! A download goes to `<data root>/.downloads/FILE.part` and continues where it stopped when run
//! again (an HTTP range request). The archive is checked (size, then checksum) before anything is
//! unpacked; unpacking writes a sibling folder that is renamed into place at the end, so the
//! destination is either absent or complete (a `.complete` file records what is in it).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};
use serde::Serialize;

use cim_api::{Error, Result};

use crate::config::DataSource;

/// A published check of an archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// MD5 of the whole file.
    Md5(&'static str),
    /// MD5 of the file's first MiB, with its size: the check fast.ai publishes for its archives
    /// (fastai's `checks.txt`). The gzip stream's own CRC-32 then covers the rest while unpacking.
    Md5FirstMiB(&'static str),
}

/// How an archive becomes the folder cim reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// CIFAR-10's binary version: `data_batch_1..5.bin` are joined into `train.bin`,
    /// `test_batch.bin` becomes `test.bin`, `batches.meta.txt` becomes `classes.txt`.
    CifarBinary,
    /// An ImageFolder archive with `TOP/train/<class>/*` and `TOP/val/<class>/*`: those two
    /// folders are unpacked, `TOP/` dropped.
    TrainVal,
}

/// A data set `cim-run data get` knows.
#[derive(Clone, Copy, Debug)]
pub struct Known {
    /// The NAME of `cim-run data get NAME`, and the folder under the data root.
    pub name: &'static str,
    pub about: &'static str,
    pub url: &'static str,
    pub size: u64,
    pub check: Check,
    pub layout: Layout,
    /// The `data.source` that reads the unpacked folder.
    pub source: DataSource,
}

/// The data sets, from their publishers.
pub const KNOWN: [Known; 3] = [
    Known {
        name: "cifar10",
        about: "CIFAR-10, binary version (Krizhevsky 2009): 50,000 train + 10,000 test images, 32 px",
        url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        size: 170_052_171,
        check: Check::Md5("c32a1d4ab5d03f1284b67883e8d87530"),
        layout: Layout::CifarBinary,
        source: DataSource::Cifar10,
    },
    Known {
        name: "imagenette",
        about: "Imagenette 2 (fast.ai), 10 ImageNet classes, shorter side 320 px: 9,469 train + 3,925 val",
        url: "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
        size: 341_663_724,
        check: Check::Md5FirstMiB("1f1f74f133caff120e575856659b87a2"),
        layout: Layout::TrainVal,
        source: DataSource::Folder,
    },
    Known {
        name: "imagenette-160",
        about: "Imagenette 2 (fast.ai), shorter side 160 px",
        url: "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
        size: 99_003_388,
        check: Check::Md5FirstMiB("c475f8f7617a200ba35b9facc48443c3"),
        layout: Layout::TrainVal,
        source: DataSource::Folder,
    },
];

/// The data set called `name`.
pub fn find(name: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.name == name)
}

/// The names `cim-run data get` accepts.
pub fn names() -> Vec<&'static str> {
    KNOWN.iter().map(|k| k.name).collect()
}

/// `cim-run data get`.
#[derive(Clone, Debug)]
pub struct GetArgs {
    pub name: String,
    /// The data root (`data.root` or its default); the set goes to `<root>/<name>` unless `to`.
    pub root: PathBuf,
    pub to: Option<PathBuf>,
    /// A mirror of the archive; checked against the built-in checksum unless `md5` is given.
    pub url: Option<String>,
    /// The MD5 of the whole archive at `url` (a different archive than the publisher's).
    pub md5: Option<String>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
}

/// What `get` did.
#[derive(Clone, Debug, Serialize)]
pub struct GetReport {
    pub name: String,
    pub path: PathBuf,
    /// False when the folder was already complete.
    pub fetched: bool,
    /// Bytes transferred by this call (0 when the archive was already downloaded).
    pub downloaded: u64,
    /// Bytes of an earlier, interrupted download that this call continued from.
    pub resumed_from: u64,
    pub files: usize,
}

const COMPLETE: &str = ".complete";

/// Whether `dir` holds a data set `get` finished unpacking.
pub fn is_complete(dir: &Path) -> bool {
    dir.join(COMPLETE).is_file()
}

/// Downloads, checks and unpacks a data set. A folder that is already complete is left alone.
pub fn get(args: &GetArgs) -> Result<GetReport> {
    let known = find(&args.name).ok_or_else(|| {
        Error::config(format!(
            "unknown data set {:?}; `cim-run data get` knows {}",
            args.name,
            names().join(", ")
        ))
    })?;
    let dest = args
        .to
        .clone()
        .unwrap_or_else(|| args.root.join(known.name));
    let mut report = GetReport {
        name: known.name.into(),
        path: dest.clone(),
        fetched: false,
        downloaded: 0,
        resumed_from: 0,
        files: 0,
    };
    if is_complete(&dest) {
        report.files = count_files(&dest)?;
        return Ok(report);
    }
    if dest.exists() && !is_empty_dir(&dest)? {
        return Err(Error::Data {
            path: dest.display().to_string(),
            message: format!(
                "exists and is not a complete {} folder (no {COMPLETE}); move it away or choose --to DIR",
                known.name
            ),
        });
    }
    let url = args.url.as_deref().unwrap_or(known.url);
    let check = match &args.md5 {
        Some(hex) => Expect::Md5(hex.to_lowercase()),
        // The publisher's archive, or a mirror of it.
        None => Expect::Known(known.check, known.size),
    };
    let file_name = url
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(known.name);
    let downloads = dest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join(".downloads");
    std::fs::create_dir_all(&downloads).map_err(|e| Error::io(&downloads, e))?;
    let part = downloads.join(format!("{file_name}.part"));
    let (downloaded, resumed_from) = download(url, &part, args.progress)?;
    report.downloaded = downloaded;
    report.resumed_from = resumed_from;
    if let Err(e) = verify(&part, &check, url) {
        // A damaged or different file: start from scratch next time.
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    let staging = dest.with_file_name(format!(
        ".{}.unpack-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    let unpacked = unpack(&part, known.layout, &staging).and_then(|files| {
        let marker = serde_json::json!({"name": known.name, "url": url, "files": files});
        write(&staging.join(COMPLETE), marker.to_string().as_bytes())?;
        Ok(files)
    });
    let files = match unpacked {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if dest.exists() {
        // An empty folder the user made for it.
        std::fs::remove_dir(&dest).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(&staging, &dest).map_err(|e| Error::io(&dest, e))?;
    std::fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
    let _ = std::fs::remove_dir(&downloads); // only when empty
    report.fetched = true;
    report.files = files;
    Ok(report)
}

enum Expect {
    Known(Check, u64),
    Md5(String),
}

/// Fetches `url` into `part`, continuing a partial file with a range request. Returns the bytes
/// transferred now and the size of the partial file it continued.
fn download(url: &str, part: &Path, progress: bool) -> Result<(u64, u64)> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let net = |e: String| Error::Data {
        path: url.to_string(),
        message: format!(
            "download failed: {e}{}",
            if have > 0 || part.exists() {
                format!("; rerun to continue from {}", part.display())
            } else {
                String::new()
            }
        ),
    };
    let resp = match req.call() {
        Ok(r) => r,
        // The partial file is already whole: nothing left to send.
        Err(ureq::Error::Status(416, _)) if have > 0 => return Ok((0, have)),
        Err(ureq::Error::Status(code, r)) => {
            return Err(net(format!("HTTP {code} {}", r.status_text())))
        }
        Err(e) => return Err(net(e.to_string())),
    };
    let (mut file, start) = if resp.status() == 206 && have > 0 {
        let f = OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(|e| Error::io(part, e))?;
        (f, have)
    } else {
        // A server that ignores ranges sends the whole file again.
        (File::create(part).map_err(|e| Error::io(part, e))?, 0)
    };
    let total = resp
        .header("Content-Length")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| n + start);
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:32} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template"),
        );
        bar.set_message(
            part.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string(),
        );
        bar.set_position(start);
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = body
            .read(&mut buf)
            .map_err(|e| net(format!("{e} after {} bytes", start + got)))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(|e| Error::io(part, e))?;
        got += n as u64;
        bar.set_position(start + got);
    }
    file.sync_all().map_err(|e| Error::io(part, e))?;
    bar.finish_and_clear();
    if let Some(t) = total {
        if start + got != t {
            return Err(net(format!(
                "the connection closed after {} of {t} bytes",
                start + got
            )));
        }
    }
    Ok((got, start))
}

fn md5_hex(r: &mut impl Read, limit: u64) -> std::io::Result<String> {
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut r = r.take(limit);
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn verify(part: &Path, expect: &Expect, url: &str) -> Result<()> {
    let mut f = File::open(part).map_err(|e| Error::io(part, e))?;
    let len = f.metadata().map_err(|e| Error::io(part, e))?.len();
    let bad = |message: String| Error::Data {
        path: url.to_string(),
        message: format!("{message}; the download was removed, rerun to fetch it again"),
    };
    let (want, got) = match expect {
        Expect::Known(check, size) => {
            if len != *size {
                return Err(bad(format!(
                    "{len} bytes, the publisher's archive has {size}"
                )));
            }
            match check {
                Check::Md5(hex) => (*hex, md5_hex(&mut f, u64::MAX)),
                Check::Md5FirstMiB(hex) => (*hex, md5_hex(&mut f, 1 << 20)),
            }
        }
        Expect::Md5(hex) => (hex.as_str(), md5_hex(&mut f, u64::MAX)),
    };
    let got = got.map_err(|e| Error::io(part, e))?;
    if got != want {
        return Err(bad(format!("MD5 {got}, expected {want}")));
    }
    Ok(())
}

/// The entries of a `.tar.gz` as (path inside the archive, reader), regular files only.
fn each_file(archive: &Path, mut f: impl FnMut(&Path, &mut dyn Read) -> Result<()>) -> Result<()> {
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(file));
    let mut tar = tar::Archive::new(gz);
    let broken = |e: std::io::Error| Error::Data {
        path: archive.display().to_string(),
        message: format!("not a readable .tar.gz archive: {e}"),
    };
    for entry in tar.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(broken)?.into_owned();
        f(&path, &mut entry)?;
    }
    Ok(())
}

fn unpack(archive: &Path, layout: Layout, to: &Path) -> Result<usize> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    match layout {
        Layout::CifarBinary => unpack_cifar(archive, to),
        Layout::TrainVal => unpack_train_val(archive, to),
    }
}

fn unpack_cifar(archive: &Path, to: &Path) -> Result<usize> {
    let mut batches: [Option<Vec<u8>>; 6] = Default::default();
    let mut meta = None;
    each_file(archive, |path, r| {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let slot = match name.as_ref() {
            "test_batch.bin" => Some(5),
            "batches.meta.txt" => {
                let mut s = String::new();
                r.read_to_string(&mut s).map_err(|e| Error::io(path, e))?;
                meta = Some(s);
                None
            }
            n => n
                .strip_prefix("data_batch_")
                .and_then(|n| n.strip_suffix(".bin"))
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|k| (1..=5).contains(k))
                .map(|k| k - 1),
        };
        if let Some(i) = slot {
            let mut v = vec![];
            r.read_to_end(&mut v).map_err(|e| Error::io(path, e))?;
            if v.is_empty() || v.len() % crate::data::CIFAR_RECORD != 0 {
                return Err(Error::Data {
                    path: format!("{}: {}", archive.display(), path.display()),
                    message: format!(
                        "{} bytes is not a whole number of {}-byte CIFAR-10 records",
                        v.len(),
                        crate::data::CIFAR_RECORD
                    ),
                });
            }
            batches[i] = Some(v);
        }
        Ok(())
    })?;
    let missing: Vec<&str> = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ]
    .into_iter()
    .zip(&batches)
    .filter(|(_, b)| b.is_none())
    .map(|(n, _)| n)
    .collect();
    if !missing.is_empty() {
        return Err(Error::Data {
            path: archive.display().to_string(),
            message: format!("not CIFAR-10's binary version: no {}", missing.join(", ")),
        });
    }
    let train: Vec<u8> = batches[..5].iter().flatten().flatten().copied().collect();
    write(&to.join("train.bin"), &train)?;
    write(
        &to.join("test.bin"),
        batches[5].as_deref().unwrap_or_default(),
    )?;
    let classes: Vec<&str> = meta
        .as_deref()
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    write(
        &to.join("classes.txt"),
        (classes.join("\n") + "\n").as_bytes(),
    )?;
    Ok(3)
}

fn unpack_train_val(archive: &Path, to: &Path) -> Result<usize> {
    let mut files = 0;
    each_file(archive, |path, r| {
        // TOP/(train|val)/<class>/<file>, nothing else.
        let parts: Vec<&str> = path
            .components()
            .map(|c| match c {
                Component::Normal(s) => s.to_str().unwrap_or(""),
                _ => "",
            })
            .collect();
        if parts.len() != 4 || parts.iter().any(|p| p.is_empty() || p.starts_with('.')) {
            return Ok(());
        }
        if parts[1] != "train" && parts[1] != "val" {
            return Ok(());
        }
        let dir = to.join(parts[1]).join(parts[2]);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let out = dir.join(parts[3]);
        let mut w = File::create(&out).map_err(|e| Error::io(&out, e))?;
        std::io::copy(r, &mut w).map_err(|e| Error::io(&out, e))?;
        files += 1;
        Ok(())
    })?;
    for split in ["train", "val"] {
        if !to.join(split).is_dir() {
            return Err(Error::Data {
                path: archive.display().to_string(),
                message: format!("holds no TOP/{split}/<class>/ images"),
            });
        }
    }
    Ok(files)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    Ok(p.is_dir()
        && std::fs::read_dir(p)
            .map_err(|e| Error::io(p, e))?
            .next()
            .is_none())
}

fn count_files(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            n += count_files(&p)?;
        } else if p.file_name().is_some_and(|n| n != COMPLETE) {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_known_digests() {
        // RFC 1321's test suite.
        let h = |s: &str, limit| md5_hex(&mut s.as_bytes(), limit).unwrap();
        assert_eq!(h("", u64::MAX), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(h("abc", u64::MAX), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(h("abcdef", 3), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn every_known_set_is_found_by_name() {
        for k in KNOWN {
            assert_eq!(find(k.name).unwrap().url, k.url);
        }
        assert!(find("imagenet").is_none());
    }
}

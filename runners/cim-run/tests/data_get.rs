//! `cim-run data get` against a loopback HTTP server holding small archives the tests build:
//! CIFAR-10's binary layout end to end (fetch, then train a preset without `--set data.path`),
//! an interrupted download continued by a range request, a bad checksum, an ImageFolder archive.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

/// One archive served at `http://127.0.0.1:PORT/NAME`; honours `Range: bytes=N-`. With `cut`, the
/// first response announces the whole file but sends only half of it, then closes. Stops by
/// itself after `max_requests` requests or 60 s.
struct Server {
    port: u16,
    ranges: Arc<Mutex<Vec<Option<u64>>>>,
}

fn serve(body: Vec<u8>, cut: bool, max_requests: usize) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let ranges = Arc::new(Mutex::new(vec![]));
    let seen = ranges.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut served = 0;
        while served < max_requests && Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("range: bytes=") {
                    range = v.trim().trim_end_matches('-').parse::<u64>().ok();
                }
            }
            seen.lock().unwrap().push(range);
            let mut w = stream;
            let from = range.unwrap_or(0) as usize;
            let head = match range {
                Some(r) => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {r}-{}/{}\r\nConnection: close\r\n\r\n",
                    body.len() - from,
                    body.len() - 1,
                    body.len()
                ),
                None => format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                ),
            };
            let _ = w.write_all(head.as_bytes());
            let end = if cut && served == 0 {
                body.len() / 2
            } else {
                body.len()
            };
            let _ = w.write_all(&body[from..end]);
            let _ = w.flush();
            served += 1;
        }
    });
    Server { port, ranges }
}

fn tar_gz(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

fn md5_hex(b: &[u8]) -> String {
    Md5::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

/// CIFAR-10's binary archive with `n` records per batch; record `r` of batch `b` has label
/// `(b + r) % 10` and every pixel byte `b * 16 + r`.
fn cifar_archive(n: usize) -> Vec<u8> {
    let batch = |b: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|r| {
                let mut rec = vec![((b + r) % 10) as u8];
                rec.extend(std::iter::repeat_n((b * 16 + r) as u8, 3072));
                rec
            })
            .collect()
    };
    let mut files: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|b| (format!("cifar-10-batches-bin/data_batch_{b}.bin"), batch(b)))
        .collect();
    files.push(("cifar-10-batches-bin/test_batch.bin".into(), batch(6)));
    files.push((
        "cifar-10-batches-bin/batches.meta.txt".into(),
        b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n".to_vec(),
    ));
    files.push((
        "cifar-10-batches-bin/readme.html".into(),
        b"<html/>".to_vec(),
    ));
    tar_gz(&files)
}

mod common;
use common::text;

fn cim_run(args: &[&str], root: &Path) -> std::process::Output {
    common::cim_run(args, &[("CIM_DATA__ROOT", root.as_os_str())])
}

/// `cim-run data get NAME --url URL --md5 MD5` under the data root `root`.
fn get(name: &str, url: &str, archive: &[u8], root: &Path) -> std::process::Output {
    cim_run(
        &[
            "data",
            "get",
            name,
            "--url",
            url,
            "--md5",
            &md5_hex(archive),
        ],
        root,
    )
}

#[test]
fn cifar10_is_fetched_checked_unpacked_and_trained_on_without_a_data_path() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let archive = cifar_archive(8);
    let server = serve(archive.clone(), false, 1);
    let url = format!("http://127.0.0.1:{}/cifar-10-binary.tar.gz", server.port);

    // Before: the preset names data.path, where it looked and the command that fetches it.
    let out = tmp.path().join("run");
    let o = cim_run(
        &[
            "--preset",
            "tiny_vit_respix",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
        &root,
    );
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains("data.path = \"cifar10\"")
            && t.contains(&root.join("cifar10").display().to_string())
            && t.contains("cim-run data get cifar10"),
        "{t}"
    );

    let o = get("cifar10", &url, &archive, &root);
    assert!(o.status.success(), "{}", text(&o));
    let dir = root.join("cifar10");
    let train = std::fs::read(dir.join("train.bin")).unwrap();
    let test = std::fs::read(dir.join("test.bin")).unwrap();
    assert_eq!((train.len(), test.len()), (40 * 3073, 8 * 3073));
    // Batches joined in order 1..5: record 8 is batch 2's first (label 2, pixels 32).
    assert_eq!((train[8 * 3073], train[8 * 3073 + 1]), (2, 32));
    assert_eq!(test[3073 + 1], 6 * 16 + 1);
    let classes = std::fs::read_to_string(dir.join("classes.txt")).unwrap();
    assert_eq!(classes.lines().count(), 10);
    assert!(!root.join(".downloads").exists(), "the archive is removed");

    // A second call finds it complete and does not download.
    let o = cim_run(&["data", "get", "cifar10", "--url", &url], &root);
    assert!(text(&o).contains("already complete"), "{}", text(&o));
    assert_eq!(server.ranges.lock().unwrap().len(), 1);

    let o = cim_run(
        &[
            "--preset",
            "tiny_vit_respix",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "data.workers=1",
        ],
        &root,
    );
    assert!(o.status.success(), "{}", text(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"step\"")).count(),
        2
    );
}

#[test]
fn an_interrupted_download_continues_with_a_range_request() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let archive = cifar_archive(4);
    let server = serve(archive.clone(), true, 2);
    let url = format!("http://127.0.0.1:{}/c.tar.gz", server.port);
    let md5 = md5_hex(&archive);
    let args = ["data", "get", "cifar10", "--url", &url, "--md5", &md5];

    let o = cim_run(&args, &root);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("rerun to continue"), "{t}");
    let part = root.join(".downloads/c.tar.gz.part");
    assert_eq!(
        std::fs::metadata(&part).unwrap().len(),
        archive.len() as u64 / 2
    );

    let o = cim_run(&args, &root);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("continuing"), "{}", text(&o));
    assert_eq!(
        *server.ranges.lock().unwrap(),
        vec![None, Some(archive.len() as u64 / 2)]
    );
    assert_eq!(
        std::fs::metadata(root.join("cifar10/train.bin"))
            .unwrap()
            .len(),
        20 * 3073
    );
}

#[test]
fn a_bad_checksum_is_refused_and_the_download_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let archive = cifar_archive(2);
    let server = serve(archive.clone(), false, 2);
    let url = format!("http://127.0.0.1:{}/c.tar.gz", server.port);
    let o = cim_run(
        &[
            "data",
            "get",
            "cifar10",
            "--url",
            &url,
            "--md5",
            &"0".repeat(32),
        ],
        &root,
    );
    let t = text(&o);
    assert!(!o.status.success());
    assert!(
        t.contains(&format!(
            "MD5 {}, expected {}",
            md5_hex(&archive),
            "0".repeat(32)
        )),
        "{t}"
    );
    assert!(!root.join(".downloads/c.tar.gz.part").exists());
    assert!(!root.join("cifar10").exists());

    // A mirror without --md5 is held to the publisher's size and checksum.
    let o = cim_run(&["data", "get", "cifar10", "--url", &url], &root);
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("the publisher's archive has 170052171"), "{t}");
}

#[test]
fn an_image_folder_archive_unpacks_train_and_val() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let png = |v: u8| {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([v, v, v]));
        let mut b = std::io::Cursor::new(vec![]);
        img.write_to(&mut b, image::ImageFormat::Png).unwrap();
        b.into_inner()
    };
    let mut files = vec![];
    for split in ["train", "val"] {
        for class in ["n01", "n02"] {
            for i in 0..2u8 {
                files.push((format!("imagenette2-320/{split}/{class}/{i}.png"), png(i)));
            }
        }
    }
    files.push((
        "imagenette2-320/noisy_imagenette.csv".into(),
        b"path\n".to_vec(),
    ));
    let archive = tar_gz(&files);
    let server = serve(archive.clone(), false, 1);
    let url = format!("http://127.0.0.1:{}/imagenette2-320.tgz", server.port);
    let o = get("imagenette", &url, &archive, &root);
    assert!(o.status.success(), "{}", text(&o));
    let dir = root.join("imagenette");
    assert!(dir.join("train/n02/1.png").is_file() && dir.join("val/n01/0.png").is_file());
    assert!(!dir.join("noisy_imagenette.csv").exists());
}

#[test]
fn an_unknown_data_set_lists_the_known_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let o = cim_run(&["data", "get", "imagenet"], tmp.path());
    let t = text(&o);
    assert!(!o.status.success());
    assert!(t.contains("cifar10, imagenette, imagenette-160"), "{t}");
}

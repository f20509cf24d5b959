//! Datasets and BEiT's two views of one RandomResizedCrop (book: "One training step", stage 0).
//!
//! Every random choice of a sample comes from an RNG seeded by `(seed, epoch, position)`, so a
//! batch is the same whatever order or thread produced it; the epoch order is a seeded shuffle.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use cim_api::{Error, Result};

use crate::config::{DataConfig, DataSource, Split};

/// A random-access collection of RGB images.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Image `i`; decoding problems are errors naming the file or record.
    fn get(&self, i: usize) -> Result<RgbImage>;
    fn describe(&self) -> String;
    /// Class index of image `i`, for labelled datasets (evaluation); `None` when unlabelled.
    fn label(&self, _i: usize) -> Option<usize> {
        None
    }
    /// Number of classes of a labelled dataset (0 when unlabelled).
    fn num_classes(&self) -> usize {
        0
    }
}

/// The embedded quickstart photographs (see `assets/quickstart/LICENSE.md`).
pub const QUICKSTART: &[(&str, &[u8])] = &[
    (
        "astronaut.jpg",
        include_bytes!("../assets/quickstart/astronaut.jpg"),
    ),
    (
        "chelsea.jpg",
        include_bytes!("../assets/quickstart/chelsea.jpg"),
    ),
    (
        "coffee.jpg",
        include_bytes!("../assets/quickstart/coffee.jpg"),
    ),
    (
        "coins.jpg",
        include_bytes!("../assets/quickstart/coins.jpg"),
    ),
    (
        "hubble_deep_field.jpg",
        include_bytes!("../assets/quickstart/hubble_deep_field.jpg"),
    ),
    (
        "retina.jpg",
        include_bytes!("../assets/quickstart/retina.jpg"),
    ),
    (
        "rocket.jpg",
        include_bytes!("../assets/quickstart/rocket.jpg"),
    ),
];

/// Decoded once at start: a handful of small photos.
pub struct Embedded {
    images: Vec<RgbImage>,
}

impl Embedded {
    pub fn quickstart() -> Result<Self> {
        let images = QUICKSTART
            .iter()
            .map(|(name, bytes)| {
                image::load_from_memory(bytes)
                    .map(|i| i.to_rgb8())
                    .map_err(|e| Error::Data {
                        path: format!("embedded:{name}"),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { images })
    }
}

impl Dataset for Embedded {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn get(&self, i: usize) -> Result<RgbImage> {
        Ok(self.images[i].clone())
    }
    fn describe(&self) -> String {
        format!("{} embedded quickstart photographs", self.images.len())
    }
}

/// CIFAR-10 binary version: records of 1 label byte + 3072 bytes (1024 R, 1024 G, 1024 B).
pub struct Cifar10 {
    path: PathBuf,
    bytes: Vec<u8>,
}

pub const CIFAR_RECORD: usize = 3073;

impl Cifar10 {
    /// `path` is a `.bin` file, or a folder holding `{split}.bin`.
    pub fn open(path: &Path, split: Split) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(format!("{}.bin", split.name()))
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&file).map_err(|e| Error::io(&file, e))?;
        if bytes.is_empty() || bytes.len() % CIFAR_RECORD != 0 {
            return Err(Error::Data {
                path: file.display().to_string(),
                message: format!(
                    "{} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records",
                    bytes.len()
                ),
            });
        }
        Ok(Self { path: file, bytes })
    }
    pub fn class_of(&self, i: usize) -> u8 {
        self.bytes[i * CIFAR_RECORD]
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.bytes.len() / CIFAR_RECORD
    }
    fn get(&self, i: usize) -> Result<RgbImage> {
        let rec = &self.bytes[i * CIFAR_RECORD + 1..(i + 1) * CIFAR_RECORD];
        let mut img = RgbImage::new(32, 32);
        for (p, px) in img.pixels_mut().enumerate() {
            *px = image::Rgb([rec[p], rec[1024 + p], rec[2048 + p]]);
        }
        Ok(img)
    }
    fn describe(&self) -> String {
        format!("CIFAR-10 {} ({} images)", self.path.display(), self.len())
    }
    fn label(&self, i: usize) -> Option<usize> {
        Some(self.class_of(i) as usize)
    }
    fn num_classes(&self) -> usize {
        10
    }
}

/// ImageFolder: `root/<class>/<image>`; JPEG and PNG of any size, grayscale converted to RGB.
/// Labels are the class folders' indices in sorted order.
pub struct Folder {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Vec<usize>,
    classes: Vec<String>,
}

impl Folder {
    pub fn open(root: &Path) -> Result<Self> {
        let mut dirs = vec![];
        for class in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let class = class.map_err(|e| Error::io(root, e))?.path();
            if class.is_dir() {
                dirs.push(class);
            }
        }
        dirs.sort();
        let mut files = vec![];
        for class in &dirs {
            for f in std::fs::read_dir(class).map_err(|e| Error::io(class, e))? {
                let f = f.map_err(|e| Error::io(class, e))?.path();
                let ext = f.extension().map(|e| e.to_string_lossy().to_lowercase());
                if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
                    files.push(f);
                }
            }
        }
        files.sort();
        let classes: Vec<String> = dirs
            .iter()
            .map(|d| {
                d.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string()
            })
            .collect();
        let labels = files
            .iter()
            .map(|f| {
                let c = f.parent().and_then(|p| p.file_name()).unwrap_or_default();
                classes
                    .iter()
                    .position(|n| n.as_str() == c.to_string_lossy())
                    .expect("files are listed from class folders")
            })
            .collect();
        if files.is_empty() {
            return Err(Error::Data {
                path: root.display().to_string(),
                message: "no images found (expected <root>/<class>/*.jpg|jpeg|png)".into(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            files,
            labels,
            classes,
        })
    }
}

impl Dataset for Folder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn get(&self, i: usize) -> Result<RgbImage> {
        read_image(&self.files[i])
    }
    fn describe(&self) -> String {
        format!(
            "image folder {} ({} images)",
            self.root.display(),
            self.files.len()
        )
    }
    fn label(&self, i: usize) -> Option<usize> {
        Some(self.labels[i])
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
}

/// Decodes a JPEG or PNG by its content (not its name) to RGB: grayscale, RGBA and CMYK are
/// converted. Empty files, other formats and JPEGs without their end-of-image marker (truncated
/// downloads, which decoders would otherwise fill with grey) are errors.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty file (0 bytes)".into());
    }
    let format = image::guess_format(bytes)
        .map_err(|_| "not an image (no JPEG or PNG signature)".to_string())?;
    match format {
        image::ImageFormat::Jpeg => {
            let end = bytes
                .iter()
                .rposition(|&b| !matches!(b, 0 | b'\n' | b'\r' | b' '))
                .unwrap_or(0);
            if end < 1 || bytes[end - 1..=end] != [0xFF, 0xD9] {
                return Err("truncated JPEG (no end-of-image marker)".into());
            }
        }
        image::ImageFormat::Png => {}
        other => return Err(format!("{other:?} images are not supported (JPEG or PNG)")),
    }
    image::load_from_memory_with_format(bytes, format)
        .map(|i| i.to_rgb8())
        .map_err(|e| e.to_string())
}

/// Reads and decodes an image file ([`decode_image`]); problems are errors naming the file.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes).map_err(|message| Error::Data {
        path: path.display().to_string(),
        message,
    })
}

/// A labelled split for evaluation: CIFAR-10's `train.bin`/`test.bin` under `data.path`, or an
/// ImageFolder's `path/train` / `path/val`. `who` names the command in the error for unlabelled data.
pub fn open_labelled(data: &DataConfig, train: bool, who: &str) -> Result<Box<dyn Dataset>> {
    if data.source == DataSource::Quickstart {
        return Err(Error::config(format!(
            "{who} needs labelled data: data.source \"cifar10\" or \"folder\""
        )));
    }
    let path = locate(data)?;
    Ok(match data.source {
        DataSource::Cifar10 => Box::new(Cifar10::open(
            &path,
            if train { Split::Train } else { Split::Test },
        )?),
        _ => {
            let split = if train { "train" } else { "val" };
            let dir = path.join(split);
            if !dir.is_dir() {
                return Err(Error::Data {
                    path: path.display().to_string(),
                    message: format!(
                        "{who} reads labelled images from train/ and val/ (PATH/train/<class>/*.jpg, \
                         PATH/val/<class>/*.jpg); there is no {}",
                        dir.display()
                    ),
                });
            }
            Box::new(Folder::open(&dir)?)
        }
    })
}

/// The data root: `data.root`, else [`default_root`].
pub fn root(data: &DataConfig) -> PathBuf {
    data.root.clone().unwrap_or_else(default_root)
}

/// Where data sets live unless `data.root` says otherwise: `$XDG_CACHE_HOME/cim/data`, else
/// `$HOME/.cache/cim/data`, else `./data` (no home folder).
pub fn default_root() -> PathBuf {
    let nonempty = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    match (nonempty("XDG_CACHE_HOME"), nonempty("HOME")) {
        (Some(cache), _) => cache.join("cim/data"),
        (None, Some(home)) => home.join(".cache/cim/data"),
        (None, None) => PathBuf::from("data"),
    }
}

/// The folder or file `data.path` names: an absolute path as it is; a relative one in the working
/// directory if it exists there, else under the data root ([`root`]). When neither exists the
/// error names the key, both places and the `cim-run data get` command that fetches the set.
pub fn locate(data: &DataConfig) -> Result<PathBuf> {
    let path = data.path.clone().ok_or_else(|| {
        Error::config(format!(
            "`data.path` is required for data.source = {:?}",
            data.source
        ))
    })?;
    if path.exists() {
        return Ok(path);
    }
    if path.is_absolute() {
        return Err(missing(data, &path, std::slice::from_ref(&path)));
    }
    let under_root = root(data).join(&path);
    if under_root.exists() {
        return Ok(under_root);
    }
    Err(missing(data, &path, &[path.clone(), under_root]))
}

fn missing(data: &DataConfig, path: &Path, tried: &[PathBuf]) -> Error {
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let how = match crate::datasets::find(&name) {
        Some(set) if set.source == data.source => format!(
            "fetch it with `cim-run data get {}`{}",
            set.name,
            match &data.root {
                Some(r) => format!(" --to {}", r.join(path).display()),
                None => String::new(),
            }
        ),
        _ => format!(
            "`cim-run data get` fetches {}; for other data point data.path at it \
             (--set data.path=DIR, or data.root for relative paths)",
            crate::datasets::names().join(", ")
        ),
    };
    Error::Config(format!(
        "data.path = {:?}: no such file or folder (looked for {}); {how}",
        path.display().to_string(),
        tried.join(" and ")
    ))
}

/// The indices `0..n`, or a seeded random subset of `limit` of them (sorted) when `0 < limit < n`.
pub fn subset(n: usize, limit: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if limit > 0 && limit < n {
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        idx.truncate(limit);
        idx.sort();
    }
    idx
}

/// Opens the dataset a config names.
pub fn open(cfg: &DataConfig) -> Result<Arc<dyn Dataset>> {
    Ok(match cfg.source {
        DataSource::Quickstart => Arc::new(Embedded::quickstart()?),
        DataSource::Cifar10 => Arc::new(Cifar10::open(&locate(cfg)?, cfg.split)?),
        DataSource::Folder => Arc::new(Folder::open(&locate(cfg)?)?),
    })
}

/// A crop rectangle `(x, y, w, h)`.
pub type Rect = (u32, u32, u32, u32);

/// torchvision's `RandomResizedCrop.get_params`: 10 tries at a random area and log-uniform aspect
/// ratio, then a centre crop clamped to the ratio range.
pub fn random_resized_crop(
    w: u32,
    h: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> Rect {
    let area = (w * h) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.gen_range(scale[0]..=scale[1]);
        let aspect = if lr1 > lr0 {
            rng.gen_range(lr0..lr1).exp()
        } else {
            ratio[0]
        };
        let cw = (target * aspect).sqrt().round() as u32;
        let ch = (target / aspect).sqrt().round() as u32;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let x = rng.gen_range(0..=w - cw);
            let y = rng.gen_range(0..=h - ch);
            return (x, y, cw, ch);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, ((w as f64 / ratio[0]).round() as u32).min(h))
    } else if in_ratio > ratio[1] {
        (((h as f64 * ratio[1]).round() as u32).min(w), h)
    } else {
        (w, h)
    };
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// One sample's two views, CHW f32 in `[0, 1]`.
pub struct Views {
    pub image: Vec<f32>,
    pub tok_view: Vec<f32>,
}

/// HWC bytes → CHW floats in `[0, 1]`.
pub fn chw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let n = (w * h) as usize;
    let mut out = vec![0f32; 3 * n];
    for (p, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * n + p] = px[c] as f32 / 255.0;
        }
    }
    out
}

/// Crops `rect` out of `img` and resizes it to `side`×`side` with a separable convolution filter
/// (SIMD, fast_image_resize), into CHW floats in `[0, 1]`, optionally mirrored.
fn crop_resize(
    img: &RgbImage,
    rect: Rect,
    side: usize,
    filter: FilterType,
    flip: bool,
) -> Vec<f32> {
    use fast_image_resize as fr;
    let (w, h) = img.dimensions();
    let (x, y, cw, ch) = rect;
    let plain = || {
        let crop = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
        if crop.dimensions() == (side as u32, side as u32) {
            crop
        } else {
            image::imageops::resize(&crop, side as u32, side as u32, filter)
        }
    };
    let out: RgbImage = if (cw, ch) == (side as u32, side as u32) {
        plain()
    } else {
        let alg = fr::ResizeAlg::Convolution(match filter {
            FilterType::Lanczos3 => fr::FilterType::Lanczos3,
            FilterType::Triangle => fr::FilterType::Bilinear,
            _ => fr::FilterType::CatmullRom,
        });
        let src = fr::images::ImageRef::new(w, h, img.as_raw(), fr::PixelType::U8x3);
        let mut dst = fr::images::Image::new(side as u32, side as u32, fr::PixelType::U8x3);
        let opts = fr::ResizeOptions::new()
            .resize_alg(alg)
            .crop(x as f64, y as f64, cw as f64, ch as f64);
        match src.map(|src| fr::Resizer::new().resize(&src, &mut dst, &opts)) {
            Ok(Ok(())) => RgbImage::from_raw(side as u32, side as u32, dst.into_vec())
                .expect("side² RGB pixels"),
            _ => plain(),
        }
    };
    let mut out = out;
    if flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    chw(&out)
}

/// ONE RandomResizedCrop + flip, rendered at the enhancer size (bicubic, i.e. Catmull–Rom) and at
/// the tokenizer size (Lanczos-3).
pub fn two_views(img: &RgbImage, cfg: &DataConfig, rng: &mut impl Rng) -> Views {
    let (w, h) = img.dimensions();
    let rect = random_resized_crop(w, h, cfg.crop_scale, cfg.crop_ratio, rng);
    let flip = cfg.hflip && rng.gen_bool(0.5);
    Views {
        image: crop_resize(img, rect, cfg.image_size, FilterType::CatmullRom, flip),
        tok_view: crop_resize(img, rect, cfg.tokenizer_size, FilterType::Lanczos3, flip),
    }
}

/// The deterministic views for inspection (`cim-run corrupt`): the largest centred square,
/// resized like [`two_views`] (no randomness, no flip).
pub fn center_views(img: &RgbImage, cfg: &DataConfig) -> Views {
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let rect = ((w - side) / 2, (h - side) / 2, side, side);
    Views {
        image: crop_resize(img, rect, cfg.image_size, FilterType::CatmullRom, false),
        tok_view: crop_resize(img, rect, cfg.tokenizer_size, FilterType::Lanczos3, false),
    }
}

/// A batch on the device: both views in `[0, 1]`.
pub struct Batch {
    /// `(B, 3, image_size, image_size)`.
    pub image: Tensor,
    /// `(B, 3, tokenizer_size, tokenizer_size)`.
    pub tok_view: Tensor,
    /// Dataset indices of the samples.
    pub indices: Vec<usize>,
}

/// A batch still on the host, as the loader's workers produce it.
pub struct HostBatch {
    /// Position of the batch in the run (epochs follow each other).
    pub index: u64,
    pub image: Vec<f32>,
    pub tok_view: Vec<f32>,
    pub indices: Vec<usize>,
    /// Files that could not be read while making this batch (each replaced by the next readable
    /// image of the epoch's order).
    pub skipped: Vec<String>,
    /// Milliseconds spent reading + decoding files, and cropping + resizing (summed over workers).
    pub decode_ms: f64,
    pub augment_ms: f64,
}

impl HostBatch {
    pub fn to_device(
        &self,
        image_size: usize,
        tokenizer_size: usize,
        device: &Device,
    ) -> Result<Batch> {
        let b = self.indices.len();
        Ok(Batch {
            image: Tensor::from_slice(&self.image, (b, 3, image_size, image_size), device)?,
            tok_view: Tensor::from_slice(
                &self.tok_view,
                (b, 3, tokenizer_size, tokenizer_size),
                device,
            )?,
            indices: self.indices.clone(),
        })
    }
}

/// splitmix64 of a combination: independent streams for `(seed, a, b)` tuples.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// Which micro-batches of each optimizer step a loader yields: a step's global batch is `parts`
/// micro-batches in a row, and this process takes `count` of them from `first` on (a rank of a
/// data-parallel job takes `parts / world` of them, its own block). The default is the whole
/// step: one part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub parts: usize,
    pub first: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard {
        parts: 1,
        first: 0,
        count: 1,
    };

    /// The micro-batches of `rank` in a world of `world` ranks that accumulate `accum` each.
    pub fn of_rank(rank: usize, world: usize, accum: usize) -> Self {
        Self {
            parts: world * accum,
            first: rank * accum,
            count: accum,
        }
    }

    /// The run-wide index of this process's `local`-th micro-batch: step `local / count`, part
    /// `first + local % count`.
    pub fn global(&self, local: u64) -> u64 {
        let (count, parts) = (self.count.max(1) as u64, self.parts.max(1) as u64);
        (local / count) * parts + self.first as u64 + local % count
    }
}

/// Deterministic epoch-shuffled batches. Images are drawn by their position in the epoch's
/// order, and each is augmented from `(seed, epoch, position)`: what a micro-batch holds depends
/// only on the seed and where it sits in the run, whatever thread, process or how many of them
/// produced it. An epoch is a whole number of global batches (`parts` micro-batches each); the
/// images left over are dropped.
pub struct Loader {
    data: Arc<dyn Dataset>,
    cfg: DataConfig,
    batch_size: usize,
    seed: u64,
    shard: Shard,
    /// The last epoch's order, so consecutive batches do not reshuffle the whole dataset.
    order_cache: std::sync::Mutex<Option<(u64, Arc<Vec<usize>>)>>,
    pool: rayon::ThreadPool,
    /// Unreadable files warned about: one warning per file, however often it is drawn.
    warned: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Loader {
    pub fn new(
        data: Arc<dyn Dataset>,
        cfg: DataConfig,
        batch_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::msg(format!(
                "{}: the dataset is empty",
                data.describe()
            )));
        }
        let workers = if cfg.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.workers
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .thread_name(|i| format!("cim-data-{i}"))
            .build()
            .map_err(|e| Error::msg(format!("data.workers = {workers}: {e}")))?;
        Ok(Self {
            data,
            cfg,
            batch_size,
            seed,
            shard: Shard::WHOLE,
            order_cache: Default::default(),
            pool,
            warned: Default::default(),
        })
    }

    /// Whether `path` is new to the unreadable files warned about (and records it).
    fn warn_once(&self, path: &str) -> bool {
        self.warned
            .lock()
            .map(|mut w| w.insert(path.to_string()))
            .unwrap_or(true)
    }

    /// Unreadable files warned about so far.
    pub fn warned(&self) -> usize {
        self.warned.lock().map(|w| w.len()).unwrap_or(0)
    }

    /// This loader yields `shard`'s micro-batches of every step ([`Shard`]).
    pub fn sharded(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// Global batches (optimizer steps) per epoch: a last partial one is dropped; at least one,
    /// cycling small sets.
    pub fn steps_per_epoch(&self) -> usize {
        (self.data.len() / (self.batch_size * self.shard.parts.max(1))).max(1)
    }

    /// This process's micro-batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.steps_per_epoch() * self.shard.count.max(1)
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn workers(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.data
    }

    fn order(&self, epoch: u64) -> Arc<Vec<usize>> {
        let mut cache = self.order_cache.lock().expect("order cache poisoned");
        if let Some((e, order)) = cache.as_ref() {
            if *e == epoch {
                return order.clone();
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, mix(0xD47A, epoch)));
        let mut idx: Vec<usize> = (0..self.data.len()).collect();
        idx.shuffle(&mut rng);
        let idx = Arc::new(idx);
        *cache = Some((epoch, idx.clone()));
        idx
    }

    /// This process's micro-batch number `index` on the host ([`Shard::global`] places it in the
    /// run), its samples decoded on the worker pool. An unreadable file is logged, reported in
    /// [`HostBatch::skipped`] and replaced by the next readable image in the epoch's order (so the
    /// batch stays deterministic).
    pub fn host_batch(&self, index: u64) -> Result<HostBatch> {
        use rayon::prelude::*;
        let start = std::time::Instant::now();
        let global = self.shard.global(index);
        let parts = self.shard.parts.max(1) as u64;
        let (step, part) = (global / parts, (global % parts) as usize);
        let per_epoch = self.steps_per_epoch() as u64;
        let epoch = step / per_epoch;
        // The micro-batch's first position in the epoch's order.
        let first = ((step % per_epoch) as usize * parts as usize + part) * self.batch_size;
        let order = self.order(epoch);
        let n = order.len();
        type Sample = (usize, Views, Vec<String>, f64, f64);
        let samples: Vec<Result<Sample>> = self.pool.install(|| {
            (0..self.batch_size)
                .into_par_iter()
                .map(|j| {
                    let t = std::time::Instant::now();
                    let pos = first + j;
                    let mut skipped = vec![];
                    for attempt in 0..n {
                        let i = order[(pos + attempt) % n];
                        match self.data.get(i) {
                            Ok(img) => {
                                let decoded = t.elapsed().as_secs_f64() * 1e3;
                                let mut rng = rand::rngs::StdRng::seed_from_u64(mix(
                                    self.seed,
                                    mix(epoch, pos as u64),
                                ));
                                let v = two_views(&img, &self.cfg, &mut rng);
                                let total = t.elapsed().as_secs_f64() * 1e3;
                                return Ok((i, v, skipped, decoded, total - decoded));
                            }
                            Err(e) => match e.path() {
                                Some(path) => {
                                    if self.warn_once(&path) {
                                        tracing::warn!("skipping unreadable image: {e}");
                                    }
                                    skipped.push(path);
                                }
                                None => return Err(e),
                            },
                        }
                    }
                    Err(Error::msg(format!(
                        "{}: none of its {n} images could be read",
                        self.data.describe()
                    )))
                })
                .collect()
        });
        let (s, t) = (self.cfg.image_size, self.cfg.tokenizer_size);
        let mut out = HostBatch {
            index,
            image: Vec::with_capacity(self.batch_size * 3 * s * s),
            tok_view: Vec::with_capacity(self.batch_size * 3 * t * t),
            indices: Vec::with_capacity(self.batch_size),
            skipped: vec![],
            decode_ms: 0.0,
            augment_ms: 0.0,
        };
        for r in samples {
            let (i, v, skipped, dec, aug) = r?;
            out.indices.push(i);
            out.image.extend_from_slice(&v.image);
            out.tok_view.extend_from_slice(&v.tok_view);
            out.skipped.extend(skipped);
            out.decode_ms += dec;
            out.augment_ms += aug;
        }
        tracing::trace!(
            index,
            ms = start.elapsed().as_secs_f64() * 1e3,
            "batch ready"
        );
        Ok(out)
    }

    /// Batch number `step` of the whole run, on `device`.
    pub fn batch(&self, step: u64, device: &Device) -> Result<Batch> {
        self.host_batch(step)?
            .to_device(self.cfg.image_size, self.cfg.tokenizer_size, device)
    }
}

/// Batches `start, start+1, …` made ahead of time on a background thread (which fans each batch
/// out over the loader's worker pool), at most `depth` waiting. Dropping it stops the thread.
pub struct Prefetch {
    rx: std::sync::mpsc::Receiver<Result<HostBatch>>,
    next: u64,
    _thread: std::thread::JoinHandle<()>,
}

impl Prefetch {
    pub fn start(loader: Arc<Loader>, start: u64, depth: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(depth.max(1));
        let thread = std::thread::Builder::new()
            .name("cim-prefetch".into())
            .spawn(move || {
                let mut i = start;
                loop {
                    let b = loader.host_batch(i);
                    let failed = b.is_err();
                    if tx.send(b).is_err() || failed {
                        return; // receiver gone, or an error to report once
                    }
                    i += 1;
                }
            })
            .expect("spawning the prefetch thread");
        Self {
            rx,
            next: start,
            _thread: thread,
        }
    }

    /// Index of the batch [`Prefetch::next_batch`] returns.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The next batch in order.
    pub fn next_batch(&mut self) -> Result<HostBatch> {
        let b = self
            .rx
            .recv()
            .map_err(|_| Error::msg("the data loader thread stopped"))??;
        debug_assert_eq!(b.index, self.next);
        self.next += 1;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_stay_inside_and_follow_scale() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        for _ in 0..500 {
            let (x, y, w, h) =
                random_resized_crop(240, 160, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(x + w <= 240 && y + h <= 160 && w > 0 && h > 0);
            let frac = (w * h) as f64 / (240.0 * 160.0);
            assert!(frac <= 1.0 + 1e-9);
        }
        // Impossible ratio: centre crop clamped to the ratio.
        let (x, y, w, h) = random_resized_crop(100, 10, [0.99, 1.0], [1.0, 1.0], &mut rng);
        assert_eq!((x, y, w, h), (45, 0, 10, 10));
    }

    #[test]
    fn quickstart_photos_decode_and_views_have_the_right_sizes() -> Result<()> {
        let data = Embedded::quickstart()?;
        assert_eq!(data.len(), QUICKSTART.len());
        let cfg = DataConfig {
            image_size: 64,
            tokenizer_size: 32,
            ..DataConfig::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let v = two_views(&data.get(0)?, &cfg, &mut rng);
        assert_eq!(v.image.len(), 3 * 64 * 64);
        assert_eq!(v.tok_view.len(), 3 * 32 * 32);
        assert!(v.image.iter().all(|p| (0.0..=1.0).contains(p)));
        Ok(())
    }

    #[test]
    fn fast_resize_agrees_with_the_reference_filter() {
        // A smooth image: the SIMD crop+resize and image's generic resize of the cropped copy
        // differ only by rounding.
        let img = RgbImage::from_fn(120, 90, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 2) as u8, ((x + y) as u8)])
        });
        let rect = (10, 5, 100, 80);
        for (side, f) in [(64, FilterType::CatmullRom), (32, FilterType::Lanczos3)] {
            let fast = crop_resize(&img, rect, side, f, false);
            let crop = image::imageops::crop_imm(&img, 10, 5, 100, 80).to_image();
            let slow = chw(&image::imageops::resize(&crop, side as u32, side as u32, f));
            let worst = fast
                .iter()
                .zip(&slow)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 3.0 / 255.0, "{side}px: max diff {worst}");
            // Mirroring is a horizontal flip of the same rendering.
            let flipped = crop_resize(&img, rect, side, f, true);
            assert_eq!(flipped[side - 1], fast[0]);
        }
    }

    #[test]
    fn batches_depend_only_on_seed_and_step() -> Result<()> {
        let data: Arc<dyn Dataset> = Arc::new(Embedded::quickstart()?);
        let cfg = DataConfig {
            image_size: 32,
            tokenizer_size: 16,
            ..DataConfig::default()
        };
        let a = Loader::new(data.clone(), cfg.clone(), 3, 5)?;
        let b = Loader::new(data.clone(), cfg.clone(), 3, 5)?;
        let c = Loader::new(data, cfg, 3, 6)?;
        let ba = a.batch(4, &Device::Cpu)?;
        let _ = b.batch(0, &Device::Cpu)?;
        let bb = b.batch(4, &Device::Cpu)?;
        let bc = c.batch(4, &Device::Cpu)?;
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&ba.image), v(&bb.image));
        assert_ne!(v(&ba.image), v(&bc.image));
        Ok(())
    }

    /// DistributedSampler's contract: over an epoch the ranks' micro-batches are disjoint and
    /// together hold every image of the epoch once; and each is, pixel for pixel, the micro-batch
    /// a single process accumulating all of them draws at the same place in the step.
    #[test]
    fn rank_shards_are_disjoint_cover_the_epoch_and_match_one_process() -> Result<()> {
        let data: Arc<dyn Dataset> = Arc::new(Embedded::quickstart()?);
        let n = data.len();
        let cfg = DataConfig {
            image_size: 16,
            tokenizer_size: 16,
            ..DataConfig::default()
        };
        let (world, accum, micro) = (2, 2, 1);
        let one = Loader::new(data.clone(), cfg.clone(), micro, 9)?.sharded(Shard::of_rank(
            0,
            1,
            world * accum,
        ));
        let ranks: Vec<Loader> = (0..world)
            .map(|r| {
                Ok(Loader::new(data.clone(), cfg.clone(), micro, 9)?
                    .sharded(Shard::of_rank(r, world, accum)))
            })
            .collect::<Result<_>>()?;
        let steps = ranks[0].steps_per_epoch();
        assert_eq!(steps, n / (world * accum * micro));
        assert_eq!(one.steps_per_epoch(), steps);
        let mut seen = std::collections::BTreeMap::new();
        for (r, loader) in ranks.iter().enumerate() {
            assert_eq!(loader.batches_per_epoch(), steps * accum);
            for local in 0..loader.batches_per_epoch() as u64 {
                let b = loader.host_batch(local)?;
                // The same micro-batch of the one-process run: step local / accum, part r·accum + local % accum.
                let step = local / accum as u64;
                let part = (r * accum) as u64 + local % accum as u64;
                let a = one.host_batch(step * (world * accum) as u64 + part)?;
                assert_eq!(a.indices, b.indices);
                assert_eq!(a.image, b.image);
                for i in b.indices {
                    assert!(
                        seen.insert(i, r).is_none(),
                        "image {i} drawn twice in one epoch"
                    );
                }
            }
        }
        assert_eq!(seen.len(), steps * world * accum * micro);
        // The next epoch reshuffles, the same way on every rank.
        let e1: Vec<usize> = (0..world)
            .flat_map(|r| {
                ranks[r]
                    .host_batch(ranks[r].batches_per_epoch() as u64)
                    .unwrap()
                    .indices
            })
            .collect();
        assert_eq!(e1.len(), world * micro);
        Ok(())
    }

    #[test]
    fn relative_paths_are_found_under_the_root_and_labelled_folders_need_train_and_val() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sets/pets/cat")).unwrap();
        let data = DataConfig {
            source: DataSource::Folder,
            path: Some("sets/pets".into()),
            root: Some(dir.path().into()),
            ..DataConfig::default()
        };
        assert_eq!(locate(&data).unwrap(), dir.path().join("sets/pets"));
        let err = open_labelled(&data, true, "probe")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("train/ and val/") && err.contains("sets/pets/train"),
            "{err}"
        );
        let gone = DataConfig {
            path: Some("cifar10".into()),
            source: DataSource::Cifar10,
            ..data
        };
        let err = locate(&gone).err().unwrap().to_string();
        assert!(
            err.contains("data.path = \"cifar10\"")
                && err.contains(&dir.path().join("cifar10").display().to_string())
                && err.contains("--to"),
            "{err}"
        );
    }

    #[test]
    fn cifar_records_are_read_plane_by_plane_and_bad_sizes_rejected() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = vec![7u8];
        rec.extend((0..3072).map(|i| (i / 1024) as u8 * 100 + ((i % 1024) % 7) as u8));
        std::fs::write(dir.path().join("train.bin"), &rec).unwrap();
        let d = Cifar10::open(dir.path(), Split::Train)?;
        assert_eq!((d.len(), d.label(0)), (1, Some(7)));
        let img = d.get(0)?;
        assert_eq!(img.get_pixel(1, 0).0, [1, 101, 201]);
        std::fs::write(dir.path().join("test.bin"), &rec[..100]).unwrap();
        let err = Cifar10::open(dir.path(), Split::Test)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("test.bin") && err.contains("3073"), "{err}");
        Ok(())
    }
}

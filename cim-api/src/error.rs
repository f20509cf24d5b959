//! Typed errors of the library crates. Binaries wrap them in `anyhow`.

/// Everything a cim library call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tensor maths failed (shape mismatch, device error, …).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A configuration value is wrong; the message names the key and where it was set.
    #[error("{0}")]
    Config(String),

    /// A component name that no plugin registered.
    #[error("unknown {kind} `{name}`{origin}; available: {available}")]
    UnknownComponent {
        kind: &'static str,
        name: String,
        origin: String,
        available: String,
    },

    /// Two plugins registered the same name for the same kind.
    #[error(
        "{kind} `{name}` is registered twice (by {first} and by {second}); names must be unique"
    )]
    DuplicateComponent {
        kind: &'static str,
        name: String,
        first: String,
        second: String,
    },

    /// A component was asked for something the pipeline did not provide yet (build order).
    #[error("{component} needs {what}, which the pipeline has not provided at build time")]
    MissingContext {
        component: String,
        what: &'static str,
    },

    /// Training diverged: a loss or the gradient norm is not finite at optimizer step `step`
    /// (1-based). The run stopped before that update; the message says where and what to do.
    #[error("{message}")]
    Diverged { step: usize, message: String },

    /// Bad input data (a file that is not an image, a truncated record, …), with its path.
    #[error("{path}: {message}")]
    Data { path: String, message: String },

    /// A file could not be read or written. The message holds the operating system's reason, so
    /// it is not chained again as a source (a report would print it twice).
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },

    /// Anything else, with a message saying what and where.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
    pub fn config(m: impl Into<String>) -> Self {
        Error::Config(m.into())
    }
    /// The file or record a [`Error::Data`] or [`Error::Io`] is about.
    pub fn path(&self) -> Option<String> {
        match self {
            Error::Data { path, .. } | Error::Io { path, .. } => Some(path.clone()),
            _ => None,
        }
    }
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            error: source,
        }
    }
}

impl From<figment::Error> for Error {
    fn from(e: figment::Error) -> Self {
        // figment's Display names the key and the provider (file, env var, --set) it came from;
        // it reports one error per line when there are several.
        // Keys are shown without figment's profile prefix ("default.train.lr" → "train.lr").
        let lines: Vec<String> = e
            .into_iter()
            .map(|e| e.to_string().replace("for key \"default.", "for key \""))
            .collect();
        Error::Config(lines.join("\n"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Typed parameters from figment, with errors that name the key and where it was set.
//!
//! A component section looks like this (the selected plugin's parameters live in a table named
//! after it, so switching `name` never leaves another plugin's keys behind):
//!
//! ```toml
//! [enhancer]
//! name = "vit_b16"
//!
//! [enhancer.vit_b16]   # overrides of vit_b16's own defaults
//! depth = 12
//! ```

use figment::providers::Serialized;
use figment::value::Value;
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::registry::{join, lookup, Entry, Kind};
use crate::{Error, Result};

/// `default` overridden by whatever `section` (a focused figment) sets; unknown keys and wrong
/// types are errors naming the key and its source.
pub fn extract_params<C: DeserializeOwned + Serialize>(section: &Figment, default: C) -> Result<C> {
    Ok(Figment::from(Serialized::defaults(default))
        .merge(section.clone())
        .extract()?)
}

/// A config value (for printing and for the resolved config written to the run directory).
pub fn to_value<C: Serialize>(c: &C) -> Result<Value> {
    Value::serialize(c).map_err(|e| Error::config(format!("cannot serialise parameters: {e}")))
}

/// " (set in `<provider>`)" for a key, or "" when no provider set it.
pub fn origin(fig: &Figment, key: &str) -> String {
    match fig.find_metadata(key) {
        Some(md) => match &md.source {
            Some(src) => format!(" (set by {} {src})", md.name),
            None => format!(" (set by {})", md.name),
        },
        None => String::new(),
    }
}

/// A validated component section: the selected entry and the figment focused on its table.
pub struct Selected<K: ?Sized + 'static> {
    pub entry: &'static Entry<K>,
    pub params: Figment,
}

/// Validates section `[K::KIND]` of `fig`: `name` must be registered, every other key must be the
/// name of a registered plugin of that kind whose table parses. Returns the selected one.
pub fn select<K: Kind + ?Sized>(fig: &Figment) -> Result<Selected<K>>
where
    Entry<K>: inventory::Collect,
{
    let kind = K::KIND;
    let name_key = format!("{kind}.name");
    let name: String = fig.extract_inner(&name_key).map_err(|e| {
        Error::config(format!(
            "`{name_key}` must name the {kind} to use: {}",
            Error::from(e)
        ))
    })?;
    let entry = lookup::<K>(&name, &origin(fig, &name_key))?;
    let table = crate::registry::table::<K>()?;
    let section = fig.find_value(kind)?;
    let dict = section
        .into_dict()
        .ok_or_else(|| Error::config(format!("`{kind}` must be a table{}", origin(fig, kind))))?;
    for key in dict.keys() {
        if key == "name" {
            continue;
        }
        let full = format!("{kind}.{key}");
        match table.get(key.as_str()) {
            Some(other) => {
                // Validate every plugin table present, selected or not: a typo in a table that
                // is not used now must not wait for the day it is.
                (other.params)(&fig.focus(&full), crate::registry::Variant::Default)
                    .map_err(|e| Error::config(format!("in [{full}]: {e}")))?;
            }
            None => {
                return Err(Error::config(format!(
                    "unknown key `{full}`{}: [{kind}] takes `name` and one table of parameters per {kind} ({}); \
                     parameters of the selected `{name}` go under `{kind}.{name}.*`: {}",
                    origin(fig, &full),
                    join(table.keys().copied()),
                    param_keys(entry)
                )));
            }
        }
    }
    Ok(Selected {
        entry,
        params: fig.focus(&format!("{kind}.{name}")),
    })
}

/// The parameter names of an entry (from its defaults), comma separated.
pub fn param_keys<K: ?Sized>(entry: &Entry<K>) -> String {
    match (entry.params)(&Figment::new(), crate::registry::Variant::Default) {
        Ok(v) => match v.into_dict() {
            Some(d) if !d.is_empty() => join(d.keys().map(|k| k.as_str())),
            _ => "(none)".to_string(),
        },
        Err(_) => "(unavailable)".to_string(),
    }
}

//! The configuration's layers, lowest first: the built-in defaults, the config file, environment
//! variables, flags (and `tcplake replay`'s own, which are flags by another name). Each is a figment
//! provider of values in the one [`Schema`]; figment stacks them, and remembers for every key which
//! layer gave its value: errors say where a bad value came from, and the applicability check sees what
//! the user set, not what a default filled in.

use std::collections::BTreeMap;
use std::path::PathBuf;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::keys::{self, Key};
use super::schema::{ConfigFile, Schema};
use super::ConfigError;

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default (nobody set it).
    Default,
    /// The config file.
    File(PathBuf),
    /// An environment variable: `TCPLAKE_WINDOW`.
    Env(String),
    /// A flag on the command line: `--window` (or `replay --to`).
    Flag(String),
}

impl Origin {
    /// How an error names it: the flag, the variable, or the file's key.
    pub fn describe(&self, key: &str) -> String {
        match self {
            Origin::Default => "the default".into(),
            Origin::File(p) => format!("`{}` key `{key}`", p.display()),
            Origin::Env(v) | Origin::Flag(v) => v.clone(),
        }
    }

    /// A layer's name in figment's metadata (unique per origin).
    fn name(&self) -> String {
        match self {
            Origin::Default => "default".into(),
            Origin::File(p) => format!("file {}", p.display()),
            Origin::Env(v) => format!("env {v}"),
            Origin::Flag(f) => format!("flag {f}"),
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => write!(f, "the default"),
            Origin::File(p) => write!(f, "`{}`", p.display()),
            Origin::Env(v) | Origin::Flag(v) => write!(f, "{v}"),
        }
    }
}

/// One layer: values in the schema's shape, from one origin.
struct Layer {
    name: String,
    data: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

/// A value set on the command line or in the environment: its dotted key, value and origin.
pub struct Given {
    pub key: &'static str,
    pub value: Value,
    pub origin: Origin,
}

/// The stacked layers.
pub struct Layers {
    figment: Figment,
    origins: BTreeMap<String, Origin>,
    file: Option<ConfigFile>,
}

impl Layers {
    /// Stacks the defaults, `file` and the values the command line gives (environment variables
    /// first, flags over them).
    pub fn new(file: Option<ConfigFile>, given: Vec<Given>) -> Result<Self, ConfigError> {
        let mut layers = Layers {
            figment: Figment::new(),
            origins: BTreeMap::new(),
            file: None,
        };
        layers.push(Origin::Default, dict(&Schema::defaults())?);
        if let Some(f) = &file {
            layers.push(Origin::File(f.path.clone()), dict(&f.table)?);
        }
        let (env, flags): (Vec<Given>, Vec<Given>) = given
            .into_iter()
            .partition(|g| matches!(g.origin, Origin::Env(_)));
        for g in env.into_iter().chain(flags) {
            let nested = figment::util::nest(g.key, g.value);
            layers.push(g.origin, dict(&nested)?);
        }
        layers.file = file;
        Ok(layers)
    }

    fn push(&mut self, origin: Origin, data: Dict) {
        let name = origin.name();
        self.figment = std::mem::take(&mut self.figment).merge(Layer {
            name: name.clone(),
            data,
        });
        self.origins.insert(name, origin);
    }

    /// Every setting, each from the highest layer that sets it.
    pub fn schema(&self) -> Result<Schema, ConfigError> {
        // Each layer was checked against the schema on its own (clap types the flags, the file is
        // parsed strictly), so a failure here is a value of the wrong type from a layer: say which.
        self.figment.extract().map_err(|e| {
            let key = e.path.join(".");
            let origin = e
                .metadata
                .as_ref()
                .and_then(|m| self.origins.get(m.name.as_ref()))
                .map_or_else(|| "the configuration".to_string(), |o| o.describe(&key));
            ConfigError::Layer { origin, key }
        })
    }

    /// Where the value of `key` (dotted) came from.
    pub fn origin(&self, key: &str) -> Origin {
        self.figment
            .find_metadata(key)
            .and_then(|m| self.origins.get(m.name.as_ref()))
            .cloned()
            .unwrap_or(Origin::Default)
    }

    /// Was `key` set by anyone (not left to its default)?
    pub fn is_set(&self, key: &Key) -> bool {
        key.file.is_some_and(|k| self.origin(k) != Origin::Default)
    }

    /// Every key the file sets, dotted.
    pub fn file_keys(&self) -> impl Iterator<Item = &str> {
        self.file
            .iter()
            .flat_map(|f| f.keys.iter().map(String::as_str))
    }

    /// The config file, if any.
    pub fn file(&self) -> Option<&ConfigFile> {
        self.file.as_ref()
    }

    /// Names where an invalid value came from: the flag, its environment variable, or the file key.
    pub fn locate(&self, e: ConfigError) -> ConfigError {
        match e {
            ConfigError::Invalid {
                key,
                value,
                reason,
                origin,
            } if origin.is_empty() => {
                let origin = key
                    .file
                    .map(|k| (k, self.origin(k)))
                    .filter(|(_, o)| *o != Origin::Default)
                    .map(|(k, o)| format!(" (from {})", o.describe(k)))
                    .unwrap_or_default();
                ConfigError::Invalid {
                    key,
                    value,
                    reason,
                    origin,
                }
            }
            other => other,
        }
    }

    /// The settings someone set, with where: for the applicability check.
    pub fn set_keys(&self) -> impl Iterator<Item = (&'static Key, Origin)> + '_ {
        keys::ALL.iter().copied().filter_map(|k| {
            let origin = self.origin(k.file?);
            (origin != Origin::Default).then_some((k, origin))
        })
    }
}

/// A serializable value (the schema, a TOML table) as a figment dictionary.
fn dict<T: serde::Serialize>(value: &T) -> Result<Dict, ConfigError> {
    match Value::serialize(value) {
        Ok(Value::Dict(_, d)) => Ok(d),
        // Not the value itself: it could hold credentials.
        _ => Err(ConfigError::Layer {
            origin: "the configuration".into(),
            key: "(a layer)".into(),
        }),
    }
}

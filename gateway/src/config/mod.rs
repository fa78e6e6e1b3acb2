//! Configuration: one YAML file (plus included route files) parsed into raw structs, then
//! validated whole into `model::Config`. Every problem is reported as `FILE:LINE:COL: message`.

mod model;
mod raw;
mod spans;
mod validate;
pub mod values;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::*;
pub use spans::Pos;

/// Largest configuration file Weir reads; larger ones are refused before parsing.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// One positioned problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub pos: Pos,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}", self.file.display(), self.pos.line, self.pos.col, self.message)
    }
}

/// Everything wrong with a configuration, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Loads and validates the configuration rooted at `path` to run it: every secret it names
/// must be set.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    validate::load(path, validate::Secrets::Required)
}

/// `weir validate`: the same checks, but a secret whose variable is unset is a warning (CI
/// validates without production secrets).
pub fn check(path: &Path) -> Result<Config, ConfigError> {
    validate::load(path, validate::Secrets::Optional)
}

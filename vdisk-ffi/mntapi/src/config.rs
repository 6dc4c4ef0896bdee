//! The configuration file of `VixMntapi_Init` (the same file as `VixDiskLib_InitEx`'s):
//! `key = value` lines, values optionally in double quotes, keys case-insensitive,
//! `#` comments. Two keys matter here: `tmpDirectory` (where mount folders are made)
//! and `vixMntapi.cfg.LogLevel` (0-6). Other keys belong to other components and are
//! ignored, as are lines that are not `key = value`.

use std::path::PathBuf;

use crate::log::LEVEL_AUDIT;

/// The highest VDDK log level (trivia).
const MAX_LOG_LEVEL: u8 = 6;

/// What the configuration file says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    /// `tmpDirectory`: the folder mount folders are made in (None: the mount
    /// library's runtime folder).
    pub tmp_directory: Option<PathBuf>,
    /// `vixMntapi.cfg.LogLevel`.
    pub log_level: u8,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tmp_directory: None,
            log_level: LEVEL_AUDIT,
        }
    }
}

/// Parses a configuration file's text. Values of the keys used here are checked:
/// `tmpDirectory` must be an absolute path, the level a number from 0 to 6.
pub(crate) fn parse(text: &str) -> Result<Config, String> {
    let mut config = Config::default();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = unquote(value.trim());
        let number = index + 1;
        if key.eq_ignore_ascii_case("tmpDirectory") {
            let path = PathBuf::from(value);
            if !path.is_absolute() {
                return Err(format!(
                    "line {number}: tmpDirectory must be an absolute path, not \"{value}\""
                ));
            }
            config.tmp_directory = Some(path);
        } else if key.eq_ignore_ascii_case("vixMntapi.cfg.LogLevel") {
            config.log_level = value
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= MAX_LOG_LEVEL)
                .ok_or_else(|| {
                    format!("line {number}: vixMntapi.cfg.LogLevel must be 0 to 6, not \"{value}\"")
                })?;
        }
    }
    Ok(config)
}

/// `"text"` -> `text`; anything else as it is.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_case_insensitively_with_or_without_quotes() {
        let c = parse(
            "# VDDK configuration\n\
             vixDiskLib.transport.LogLevel = 4\n\
             TMPDIRECTORY = \"/var/tmp/vddk\"\n\
             vixmntapi.cfg.loglevel=5\n\
             not a key value line\n",
        )
        .unwrap();
        assert_eq!(c.tmp_directory, Some(PathBuf::from("/var/tmp/vddk")));
        assert_eq!(c.log_level, 5);
        let c = parse("tmpDirectory = /tmp/x\n").unwrap();
        assert_eq!(c.tmp_directory, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(Config::default().log_level, LEVEL_AUDIT);
    }

    #[test]
    fn bad_values_of_our_keys_are_errors_naming_the_line() {
        let e = parse("\ntmpDirectory = relative/dir\n").unwrap_err();
        assert!(
            e.starts_with("line 2: tmpDirectory must be an absolute path"),
            "{e}"
        );
        let e = parse("vixMntapi.cfg.LogLevel = 7\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("0 to 6"), "{e}");
        assert!(parse("vixMntapi.cfg.LogLevel = loud\n").is_err());
    }
}

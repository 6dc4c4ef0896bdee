//! The configuration file of `VixMntapi_Init` (the same file as `VixDiskLib_InitEx`'s):
//! `key = value` lines, values optionally in double quotes, keys case-insensitive,
//! `#` comments. Three keys matter here: `tmpDirectory` (where mount folders are
//! made, and the throwaway redo logs of non-persistent remote mounts),
//! `vixMntapi.cfg.LogLevel` (0-6) and vdisk's `vdisk.mntapi.remoteWrites`
//! (`non-persistent`, the default, or `persistent`: where read-write mounts of a
//! disk on a remote connection write). Other keys belong to other components and
//! are ignored, as are lines that are not `key = value`.

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
    /// `vdisk.mntapi.remoteWrites = persistent`: read-write mounts of a remote disk
    /// write to the server (default: to a local throwaway redo log).
    pub remote_persistent: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tmp_directory: None,
            log_level: LEVEL_AUDIT,
            remote_persistent: false,
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
        } else if key.eq_ignore_ascii_case("vdisk.mntapi.remoteWrites") {
            config.remote_persistent = match value.to_ascii_lowercase().as_str() {
                "persistent" => true,
                "non-persistent" | "nonpersistent" => false,
                _ => {
                    return Err(format!(
                        "line {number}: vdisk.mntapi.remoteWrites must be \"non-persistent\" \
                         or \"persistent\", not \"{value}\""
                    ))
                }
            };
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
        assert!(!c.remote_persistent);
        let c =
            parse("tmpDirectory = /tmp/x\nvdisk.mntapi.remoteWrites = \"Persistent\"\n").unwrap();
        assert!(c.remote_persistent);
        assert!(
            !parse("vdisk.mntapi.remoteWrites = non-persistent\n")
                .unwrap()
                .remote_persistent
        );
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
        let e = parse("vdisk.mntapi.remoteWrites = sometimes\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("persistent"), "{e}");
    }
}

//! What a check found: a bounded list of findings plus counts.
//!
//! A hostile file can hold millions of problems (every entry of every grain table
//! wrong). The report keeps at most [`MAX_LISTED_FINDINGS`] of them in full and
//! counts the rest, so the memory a check uses does not grow with what it finds.

use std::path::{Path, PathBuf};

/// Most findings a report lists in full; the rest are only counted.
pub const MAX_LISTED_FINDINGS: usize = 1000;

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The file it is in.
    pub file: PathBuf,
    /// What is wrong.
    pub problem: String,
    /// What repair did (or, when only checking, would do); None if it cannot be repaired.
    pub repair: Option<String>,
    /// Whether repair can fix it.
    pub repairable: bool,
}

impl Finding {
    /// A problem repair cannot fix.
    pub fn fatal(file: &Path, problem: impl Into<String>) -> Finding {
        Finding {
            file: file.to_path_buf(),
            problem: problem.into(),
            repair: None,
            repairable: false,
        }
    }

    /// A problem repair fixes as `repair` says.
    pub fn fixable(file: &Path, problem: impl Into<String>, repair: impl Into<String>) -> Finding {
        Finding {
            file: file.to_path_buf(),
            problem: problem.into(),
            repair: Some(repair.into()),
            repairable: true,
        }
    }
}

/// The result of [`super::check`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// The problems found, in the order found (links top first, extents in order),
    /// at most [`MAX_LISTED_FINDINGS`].
    pub findings: Vec<Finding>,
    /// Problems found beyond those listed (only counted, to bound memory).
    pub unlisted: u64,
    /// Of the unlisted problems, how many repair cannot fix.
    pub unlisted_unrepairable: u64,
    /// Whether repairs were written (false when only checking or nothing needed it).
    pub repaired: bool,
}

impl CheckReport {
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.unlisted == 0
    }

    /// Every problem found, listed or not.
    pub fn problems(&self) -> u64 {
        self.findings.len() as u64 + self.unlisted
    }

    /// Problems that remain after this call: all of them when nothing was repaired,
    /// those repair could not fix otherwise.
    pub fn unrepaired(&self) -> usize {
        let n = if self.repaired {
            self.findings.iter().filter(|f| !f.repairable).count() as u64
                + self.unlisted_unrepairable
        } else {
            self.problems()
        };
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// Whether repair could fix everything found.
    pub fn all_repairable(&self) -> bool {
        self.unlisted_unrepairable == 0 && self.findings.iter().all(|f| f.repairable)
    }

    /// Records a finding (listed while there is room, counted otherwise).
    pub(crate) fn push(&mut self, f: Finding) {
        if self.findings.len() < MAX_LISTED_FINDINGS {
            self.findings.push(f);
        } else {
            self.unlisted += 1;
            if !f.repairable {
                self.unlisted_unrepairable += 1;
            }
        }
    }
}

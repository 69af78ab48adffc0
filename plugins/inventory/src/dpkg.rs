//! A parser for dpkg's status database (`/var/lib/dpkg/status`).
//!
//! Plain Rust with no WIT types, so its tests run on the host target:
//! `cargo test -p drover-plugin-inventory --target x86_64-unknown-linux-gnu`.
//!
//! The file is a list of RFC 822-like stanzas separated by blank lines. Each field is
//! `Name: value`; a line that starts with a space or a tab continues the previous
//! field (long descriptions, conffile lists) and is skipped here.
//!
//! # Which stanzas count as packages
//!
//! The rule is dpkg-query's, so that our count equals `dpkg-query -W -f '.\n' | wc -l`:
//! **every stanza whose `Status:` state (its third word) is anything but
//! `not-installed`** is a package. That includes `config-files` (removed, config
//! left behind: `rc` in `dpkg -l`), `half-installed`, `unpacked`, `half-configured`,
//! `triggers-awaited` and `triggers-pending`, and any selection (`hold`, `deinstall`,
//! `purge`). dpkg-query's `--show` without a pattern lists "all packages in
//! /var/lib/dpkg/status, excluding the ones marked as not-installed" (dpkg-query(1),
//! `--list`, which `--show` follows). Checked with dpkg 1.21.22 against a synthetic
//! `--admindir` holding one stanza per state: it printed 8 of 10, leaving out exactly
//! the two `not-installed` ones and keeping `config-files`. (The build machine's own
//! database had 707 stanzas, all `install ok installed`, and dpkg-query printed 707.)
//!
//! A stanza with no `Status:` is `not-installed` to dpkg too, so it is not counted.
//! Stanzas dpkg would reject (no `Package:`, no `Version:` on a package that is not
//! `not-installed`, a `Status:` that is not three words or has an unknown state, a line
//! that is not a field) are skipped and counted in [`Parsed::skipped`], so the caller
//! can give one warning rather than one per line. A missing `Architecture:` only earns
//! a warning from dpkg, which still lists the package, so here it is kept with an empty
//! architecture.

/// One installed package, as the status database lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpkgPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
}

/// The outcome of parsing a whole status file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Packages that count, in the order the file lists them.
    pub packages: Vec<DpkgPackage>,
    /// Stanzas skipped because they were malformed (see the module docs).
    pub skipped: usize,
}

/// The package states dpkg knows (`Status:`'s third word), from dpkg(1).
const KNOWN_STATES: &[&str] = &[
    "not-installed",
    "config-files",
    "half-installed",
    "unpacked",
    "half-configured",
    "triggers-awaited",
    "triggers-pending",
    "installed",
];

/// Parses the text of a dpkg status file. Never panics; see the module docs for the rule.
pub fn parse_status(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let mut stanza = Stanza::default();
    // `lines` also strips a `\r` before each `\n`.
    for line in text.lines() {
        if line.trim().is_empty() {
            stanza.finish(&mut parsed);
        } else if line.starts_with([' ', '\t']) {
            // Continuation of the previous field: no field we read spans lines.
        } else if let Some((name, value)) = line.split_once(':') {
            stanza.field(name.trim(), value.trim());
        } else {
            stanza.malformed = true;
        }
    }
    stanza.finish(&mut parsed);
    parsed
}

/// The fields of the stanza being read.
#[derive(Default)]
struct Stanza<'a> {
    /// Whether any line has been seen since the last separator.
    started: bool,
    package: Option<&'a str>,
    version: Option<&'a str>,
    architecture: Option<&'a str>,
    status: Option<&'a str>,
    malformed: bool,
}

impl<'a> Stanza<'a> {
    fn field(&mut self, name: &str, value: &'a str) {
        self.started = true;
        // Field names are case-insensitive in dpkg's format; the first of a duplicate wins.
        let slot = if name.eq_ignore_ascii_case("Package") {
            &mut self.package
        } else if name.eq_ignore_ascii_case("Version") {
            &mut self.version
        } else if name.eq_ignore_ascii_case("Architecture") {
            &mut self.architecture
        } else if name.eq_ignore_ascii_case("Status") {
            &mut self.status
        } else {
            return;
        };
        slot.get_or_insert(value);
    }

    /// Ends the stanza: records its package or counts it as skipped, then resets.
    fn finish(&mut self, parsed: &mut Parsed) {
        let stanza = std::mem::take(self);
        if !stanza.started && !stanza.malformed {
            return; // several blank lines in a row
        }
        match stanza.into_package() {
            Verdict::Package(package) => parsed.packages.push(package),
            Verdict::NotInstalled => {}
            Verdict::Malformed => parsed.skipped += 1,
        }
    }

    fn into_package(self) -> Verdict {
        if self.malformed {
            return Verdict::Malformed;
        }
        let Some(name) = self.package.filter(|name| !name.is_empty()) else {
            return Verdict::Malformed;
        };
        let Some(status) = self.status else {
            return Verdict::NotInstalled;
        };
        let words: Vec<&str> = status.split_whitespace().collect();
        let [_want, _flag, state] = words[..] else {
            return Verdict::Malformed;
        };
        if !KNOWN_STATES.contains(&state) {
            return Verdict::Malformed;
        }
        if state == "not-installed" {
            return Verdict::NotInstalled;
        }
        let Some(version) = self.version.filter(|version| !version.is_empty()) else {
            return Verdict::Malformed;
        };
        Verdict::Package(DpkgPackage {
            name: name.to_owned(),
            version: version.to_owned(),
            architecture: self.architecture.unwrap_or_default().to_owned(),
        })
    }
}

enum Verdict {
    Package(DpkgPackage),
    NotInstalled,
    Malformed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(parsed: &Parsed) -> Vec<&str> {
        parsed.packages.iter().map(|p| p.name.as_str()).collect()
    }

    const SAMPLE: &str = "\
Package: libc6
Status: install ok installed
Priority: optional
Section: libs
Installed-Size: 12345
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u4
Depends: libgcc-s1
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.
 .
 Package: not-a-field-because-it-is-a-continuation
Conffiles:
 /etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab

Package: old-thing
Status: deinstall ok config-files
Architecture: all
Version: 1.0

Package: gone
Status: purge ok not-installed
Architecture: amd64

Package: base-files
Status: hold ok installed
Architecture: amd64
Version: 12.4+deb12u5
";

    #[test]
    fn parses_fields_and_skips_continuations() {
        let parsed = parse_status(SAMPLE);
        assert_eq!(parsed.skipped, 0);
        assert_eq!(names(&parsed), ["libc6", "old-thing", "base-files"]);
        assert_eq!(
            parsed.packages[0],
            DpkgPackage {
                name: "libc6".into(),
                version: "2.36-9+deb12u4".into(),
                architecture: "amd64".into(),
            }
        );
    }

    #[test]
    fn counts_every_state_but_not_installed() {
        let states = [
            ("a", "install ok installed", true),
            ("b", "deinstall ok config-files", true),
            ("c", "install reinstreq half-installed", true),
            ("d", "install ok unpacked", true),
            ("e", "install ok half-configured", true),
            ("f", "install ok triggers-awaited", true),
            ("g", "install ok triggers-pending", true),
            ("h", "install ok not-installed", false),
            ("i", "purge ok not-installed", false),
            ("j", "hold ok installed", true),
        ];
        let text: String = states
            .iter()
            .map(|(name, status, _)| {
                format!("Package: {name}\nStatus: {status}\nVersion: 1\nArchitecture: amd64\n\n")
            })
            .collect();
        let parsed = parse_status(&text);
        let expected: Vec<&str> = states
            .iter()
            .filter(|(_, _, counted)| *counted)
            .map(|(name, _, _)| *name)
            .collect();
        assert_eq!(names(&parsed), expected);
        assert_eq!(parsed.skipped, 0);
    }

    #[test]
    fn skips_malformed_stanzas_and_counts_them() {
        let text = "\
Status: install ok installed
Version: 1

Package: no-version
Status: install ok installed

Package: short-status
Status: installed
Version: 1

Package: odd-state
Status: install ok sideways
Version: 1

Package: junk-line
this line has no colon
Status: install ok installed
Version: 1

Package:
Status: install ok installed
Version: 1

Package: fine
Status: install ok installed
Version: 1
Architecture: arm64
";
        let parsed = parse_status(text);
        assert_eq!(names(&parsed), ["fine"]);
        assert_eq!(parsed.skipped, 6);
    }

    #[test]
    fn no_status_means_not_installed_and_no_architecture_is_kept() {
        let text = "Package: ghost\nVersion: 1\n\nPackage: archless\nStatus: install ok installed\nVersion: 2\n";
        let parsed = parse_status(text);
        assert_eq!(parsed.skipped, 0);
        assert_eq!(
            parsed.packages,
            [DpkgPackage {
                name: "archless".into(),
                version: "2".into(),
                architecture: String::new(),
            }]
        );
    }

    #[test]
    fn tolerates_crlf_extra_blank_lines_case_and_whitespace() {
        let text = "\r\n\r\n  \npackage:  crlf \r\nSTATUS: install  ok\tinstalled\r\nversion: 3.0 \r\narchitecture: all\r\n\r\n\r\n \t \nPackage: next\nStatus: install ok installed\nVersion: 1:2.3-4\nArchitecture: amd64";
        let parsed = parse_status(text);
        assert_eq!(parsed.skipped, 0);
        assert_eq!(names(&parsed), ["crlf", "next"]);
        assert_eq!(parsed.packages[0].version, "3.0");
        assert_eq!(parsed.packages[0].architecture, "all");
        // The epoch's colon is part of the value, not a field separator.
        assert_eq!(parsed.packages[1].version, "1:2.3-4");
    }

    #[test]
    fn first_duplicate_field_wins() {
        let text = "Package: a\nPackage: b\nStatus: install ok installed\nVersion: 1\n";
        assert_eq!(names(&parse_status(text)), ["a"]);
    }

    #[test]
    fn empty_and_garbage_input_do_not_panic() {
        assert_eq!(parse_status(""), Parsed::default());
        assert_eq!(parse_status("\n\n\n"), Parsed::default());
        let parsed = parse_status(" leading continuation\n\u{0}\u{fffd}:::\n\n:\n");
        assert!(parsed.packages.is_empty());
        assert_eq!(parsed.skipped, 2);
    }

    /// On a Debian-like host, the parser must agree with dpkg-query about this machine.
    #[test]
    fn agrees_with_dpkg_query_on_this_host() {
        let Ok(text) = std::fs::read("/var/lib/dpkg/status") else {
            return; // not a dpkg system
        };
        let Ok(output) = std::process::Command::new("dpkg-query")
            .args(["-W", "-f", ".\n"])
            .output()
        else {
            return;
        };
        let expected = output.stdout.iter().filter(|&&b| b == b'\n').count();
        let parsed = parse_status(&String::from_utf8_lossy(&text));
        assert_eq!(parsed.packages.len(), expected);
        assert_eq!(parsed.skipped, 0);
    }
}

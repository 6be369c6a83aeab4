//! The line protocol between the test guest and the host harness on the serial console:
//! how the guest writes its markers and how the host reads them back out of a console
//! stream that also carries kernel messages, and the per-scenario verdicts that follow.
//!
//! Markers: `VMTEST GUEST START` (printed by `/init` before anything else of ours),
//! `VMTEST BEGIN <name>`, `VMTEST END <name> PASS|FAIL|SKIP <reason>`, `VMTEST DONE`,
//! and `VMTEST EXIT <code>` (the guest binary's exit status, printed by `/init`).

use std::fmt;

/// Every marker starts with this token; it may appear after other text on the same line
/// (printk output can share a console line with ours).
pub const MARKER_PREFIX: &str = "VMTEST ";
/// Printed by `/init` once userspace runs: its absence means the kernel died in early boot.
pub const GUEST_START: &str = "VMTEST GUEST START";
/// Printed by the guest binary after the last scenario.
pub const DONE: &str = "VMTEST DONE";
/// Longest reason kept from an END marker; longer ones are cut (with `…`) so a runaway
/// message cannot flood the summary table.
pub const MAX_REASON_LEN: usize = 300;

/// Verdict of one scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        match word {
            "PASS" => Some(Outcome::Pass),
            "FAIL" => Some(Outcome::Fail),
            "SKIP" => Some(Outcome::Skip),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One marker read from the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    GuestStart,
    Begin(String),
    End {
        name: String,
        outcome: Outcome,
        reason: String,
    },
    Done,
    Exit(i32),
}

/// Formats a BEGIN marker line (without newline).
pub fn format_begin(name: &str) -> String {
    format!("{MARKER_PREFIX}BEGIN {name}")
}

/// Formats an END marker line (without newline); the reason is flattened to one line.
pub fn format_end(name: &str, outcome: Outcome, reason: &str) -> String {
    let flat: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    let flat = if flat.is_empty() { "-" } else { flat };
    format!("{MARKER_PREFIX}END {name} {outcome} {flat}")
}

/// Finds a marker in one console line, if there is one. Carriage returns and text before
/// the marker are ignored; a malformed marker yields `None` (it is then just console text).
pub fn parse_line(line: &str) -> Option<Marker> {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = line.find(MARKER_PREFIX)?;
    let rest = line[at + MARKER_PREFIX.len()..].trim();
    let mut words = rest.splitn(2, ' ');
    let word = words.next()?;
    let tail = words.next().unwrap_or("").trim();
    match word {
        "GUEST" if tail == "START" => Some(Marker::GuestStart),
        "DONE" if tail.is_empty() => Some(Marker::Done),
        "BEGIN" if is_scenario_name(tail) => Some(Marker::Begin(tail.to_owned())),
        "EXIT" => tail.parse().ok().map(Marker::Exit),
        "END" => {
            let mut parts = tail.splitn(3, ' ');
            let name = parts.next()?;
            let outcome = Outcome::parse(parts.next()?)?;
            if !is_scenario_name(name) {
                return None;
            }
            let mut reason = parts.next().unwrap_or("").trim().to_owned();
            if reason.len() > MAX_REASON_LEN {
                let mut cut = MAX_REASON_LEN;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
                reason.push('…');
            }
            Some(Marker::End {
                name: name.to_owned(),
                outcome,
                reason,
            })
        }
        _ => None,
    }
}

fn is_scenario_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Verdict of one scenario as the host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioResult {
    pub name: String,
    pub outcome: Outcome,
    pub reason: String,
}

/// Accumulates the markers of one boot.
#[derive(Debug, Default, Clone)]
pub struct BootLog {
    pub guest_started: bool,
    pub done: bool,
    pub exit_code: Option<i32>,
    /// Scenario that began and has not ended yet.
    pub current: Option<String>,
    pub ended: Vec<ScenarioResult>,
}

impl BootLog {
    /// Feeds one console line; returns the marker it held, if any.
    pub fn feed(&mut self, line: &str) -> Option<Marker> {
        let marker = parse_line(line)?;
        match &marker {
            Marker::GuestStart => self.guest_started = true,
            Marker::Begin(name) => self.current = Some(name.clone()),
            Marker::End {
                name,
                outcome,
                reason,
            } => {
                if self.current.as_deref() == Some(name) {
                    self.current = None;
                }
                self.ended.push(ScenarioResult {
                    name: name.clone(),
                    outcome: *outcome,
                    reason: reason.clone(),
                });
            }
            Marker::Done => self.done = true,
            Marker::Exit(code) => self.exit_code = Some(*code),
        }
        Some(marker)
    }

    /// One result per requested scenario, in the requested order. A scenario without an END
    /// marker fails, naming what was seen (`why_incomplete` says why the boot ended early).
    pub fn results(&self, requested: &[String], why_incomplete: &str) -> Vec<ScenarioResult> {
        requested
            .iter()
            .map(|name| {
                if let Some(r) = self.ended.iter().rev().find(|r| &r.name == name) {
                    return r.clone();
                }
                let reason = if self.current.as_deref() == Some(name.as_str()) {
                    format!("began but never ended ({why_incomplete})")
                } else if !self.guest_started {
                    format!("guest never started ({why_incomplete})")
                } else {
                    format!("no END marker ({why_incomplete})")
                };
                ScenarioResult {
                    name: name.clone(),
                    outcome: Outcome::Fail,
                    reason,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_marker_kind() {
        assert_eq!(
            parse_line("VMTEST GUEST START\r\n"),
            Some(Marker::GuestStart)
        );
        assert_eq!(
            parse_line("VMTEST BEGIN vsock-smoke"),
            Some(Marker::Begin("vsock-smoke".into()))
        );
        assert_eq!(
            parse_line("VMTEST END ingest FAIL emitter 2 acked 1999 of 2000"),
            Some(Marker::End {
                name: "ingest".into(),
                outcome: Outcome::Fail,
                reason: "emitter 2 acked 1999 of 2000".into()
            })
        );
        assert_eq!(parse_line("VMTEST DONE"), Some(Marker::Done));
        assert_eq!(parse_line("VMTEST EXIT 3"), Some(Marker::Exit(3)));
    }

    #[test]
    fn finds_markers_after_kernel_text_and_ignores_lookalikes() {
        assert_eq!(
            parse_line("[    1.234] random: crng init doneVMTEST END a SKIP no vigil"),
            Some(Marker::End {
                name: "a".into(),
                outcome: Outcome::Skip,
                reason: "no vigil".into()
            })
        );
        for junk in [
            "VMTEST",
            "VMTEST END x MAYBE why",
            "VMTEST END",
            "VMTEST BEGIN Bad_Name",
            "VMTEST DONE extra",
            "VMTEST EXIT x",
            "VMTEST GUEST",
            "linux VMTESTING END a PASS",
        ] {
            assert_eq!(parse_line(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn end_marker_round_trips_and_flattens_reason() {
        let line = format_end("kernel-stats", Outcome::Pass, "rows=3\npackets=10\t");
        assert_eq!(line, "VMTEST END kernel-stats PASS rows=3 packets=10");
        assert_eq!(
            parse_line(&line),
            Some(Marker::End {
                name: "kernel-stats".into(),
                outcome: Outcome::Pass,
                reason: "rows=3 packets=10".into()
            })
        );
        assert_eq!(format_end("a", Outcome::Pass, " "), "VMTEST END a PASS -");
        assert_eq!(
            parse_line(&format_begin("identity")),
            Some(Marker::Begin("identity".into()))
        );
    }

    #[test]
    fn long_reasons_are_cut() {
        let line = format_end("a", Outcome::Fail, &"é".repeat(400));
        let Some(Marker::End { reason, .. }) = parse_line(&line) else {
            panic!("no marker")
        };
        assert!(reason.len() <= MAX_REASON_LEN + '…'.len_utf8());
        assert!(reason.ends_with('…'));
    }

    #[test]
    fn boot_log_reports_missing_and_unfinished_scenarios() {
        let requested: Vec<String> = ["vsock-smoke", "ingest", "identity"]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
        let mut log = BootLog::default();
        assert!(log.results(&requested, "timeout")[0]
            .reason
            .contains("never started"));
        for line in [
            "VMTEST GUEST START",
            "VMTEST BEGIN vsock-smoke",
            "noise",
            "VMTEST END vsock-smoke PASS 1048576 bytes",
            "VMTEST BEGIN ingest",
        ] {
            log.feed(line);
        }
        assert!(log.guest_started);
        assert!(!log.done);
        let r = log.results(&requested, "host timeout after 5 s");
        assert_eq!(r[0].outcome, Outcome::Pass);
        assert_eq!(r[1].outcome, Outcome::Fail);
        assert!(r[1].reason.starts_with("began but never ended"));
        assert!(r[1].reason.contains("host timeout after 5 s"));
        assert_eq!(r[2].outcome, Outcome::Fail);
        assert!(r[2].reason.starts_with("no END marker"));
        log.feed("VMTEST END ingest SKIP no vigil binary");
        log.feed("VMTEST DONE");
        log.feed("VMTEST EXIT 0");
        assert!(log.done);
        assert_eq!(log.exit_code, Some(0));
        assert_eq!(log.current, None);
        assert_eq!(log.results(&requested, "-")[1].outcome, Outcome::Skip);
    }
}

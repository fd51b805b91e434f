//! The progress line of the long commands (`-p`): qemu-img's
//! `    (12.34/100%)`, on standard output as qemu-img prints it. On a
//! terminal it is redrawn in place; elsewhere (a pipe, a file, a test
//! harness) it is written as qemu-img writes it there: a line ended by
//! `\r` each time the work has gone more than a percent further, the
//! last one followed by a newline, so scripts that read the updates see
//! the same ones.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

/// A progress reporter; does nothing unless enabled.
pub struct Progress(Shown);

enum Shown {
    Off,
    Bar(ProgressBar),
    Lines(Mutex<Lines>),
}

/// What the plain-text form has counted and printed.
struct Lines {
    done: u64,
    total: u64,
    last_printed: f64,
}

/// qemu-img prints again once the work is this many percent further.
const MIN_STEP: f64 = 1.0;

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        if !enabled {
            return Progress(Shown::Off);
        }
        if !std::io::stdout().is_terminal() {
            print_line(0.0);
            return Progress(Shown::Lines(Mutex::new(Lines { done: 0, total: 0, last_printed: 0.0 })));
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template("    ({qemu_percent}/100%)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key("qemu_percent", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.2}", percent(s.pos(), s.len()));
            });
        bar.set_style(style);
        Progress(Shown::Bar(bar))
    }

    /// `done` bytes of `total` are done.
    pub fn update(&self, done: u64, total: u64) {
        match &self.0 {
            Shown::Off => {}
            Shown::Bar(b) => {
                if b.length() != Some(total) {
                    b.set_length(total);
                }
                b.set_position(done);
            }
            Shown::Lines(l) => {
                let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                l.done = done;
                l.total = total;
                l.maybe_print();
            }
        }
    }

    /// Counts in units of work instead of positions: the whole is
    /// `total`; see [`Progress::add`].
    pub fn set_total(&self, total: u64) {
        self.update(0, total);
    }

    /// `n` more units of work are done (callable from several threads).
    pub fn add(&self, n: u64) {
        match &self.0 {
            Shown::Off => {}
            Shown::Bar(b) => b.inc(n),
            Shown::Lines(l) => {
                let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                l.done += n;
                l.maybe_print();
            }
        }
    }

    /// The work is over: the line shows its final state, and what is
    /// printed next goes below it.
    pub fn finish(&self) {
        match &self.0 {
            Shown::Off => {}
            Shown::Bar(b) => {
                b.finish();
                if !b.is_hidden() {
                    println!();
                }
            }
            Shown::Lines(_) => {
                print_line(100.0);
                println!();
            }
        }
    }
}

impl Lines {
    fn maybe_print(&mut self) {
        // Nothing to do: the closing line alone says 100%.
        if self.total == 0 {
            return;
        }
        let p = percent(self.done, Some(self.total));
        // Also when it goes back (an amend that finds more work to do).
        let moved = p > self.last_printed + MIN_STEP || p < self.last_printed - MIN_STEP;
        if moved || (p == 100.0 && self.last_printed < 100.0) {
            self.last_printed = p;
            print_line(p);
        }
    }
}

fn print_line(p: f64) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "    ({p:.2}/100%)\r");
    let _ = out.flush();
}

/// qemu counts an empty job as done.
fn percent(done: u64, total: Option<u64>) -> f64 {
    match total {
        Some(t) if t > 0 => done.min(t) as f64 * 100.0 / t as f64,
        _ => 100.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_like_qemu() {
        assert_eq!(format!("{:.2}", percent(1, Some(3))), "33.33");
        assert_eq!(format!("{:.2}", percent(0, Some(0))), "100.00");
        assert_eq!(format!("{:.2}", percent(5, Some(4))), "100.00");
    }
}

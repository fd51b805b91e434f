//! The progress line of the long commands (`-p`): qemu-img's
//! `    (12.34/100%)`, on standard output as qemu-img prints it, redrawn in
//! place on a terminal and not drawn elsewhere.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// A progress reporter; does nothing unless enabled.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        if !enabled {
            return Progress(None);
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
        let style = ProgressStyle::with_template("    ({qemu_percent}/100%)")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key("qemu_percent", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.2}", percent(s.pos(), s.len()));
            });
        bar.set_style(style);
        Progress(Some(bar))
    }

    /// `done` bytes of `total` are done.
    pub fn update(&self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            if b.length() != Some(total) {
                b.set_length(total);
            }
            b.set_position(done);
        }
    }

    /// The work is over: the line shows its final state, and what is
    /// printed next goes below it.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish();
            if !b.is_hidden() {
                println!();
            }
        }
    }
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

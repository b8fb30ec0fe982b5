//! Progress of long byte-copying work (`cat`, and later `convert`, `merge`, `compact`):
//! a bar with bytes, rate and ETA on stderr when stderr is a terminal, nothing in pipes
//! and scripts. `--quiet` turns it off, `--progress` forces it; forced onto something
//! that is not a terminal it prints one plain line per second instead of redrawing.
//!
//! A command makes one `Progress` with the total, calls `add` as bytes are done and
//! `finish` at the end; if it returns early (an error), dropping the `Progress` leaves
//! the bar where it stopped and the error line follows on a line of its own.

use std::io::Write;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// When to show progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only when stderr is a terminal (and TERM is not `dumb`).
    Auto,
    /// Always (`--progress`).
    Always,
    /// Never (`--quiet`).
    Never,
}

impl Mode {
    /// From a command's `--quiet` / `--progress` flags (clap makes them exclusive).
    pub fn from_flags(quiet: bool, progress: bool) -> Mode {
        match (quiet, progress) {
            (true, _) => Mode::Never,
            (false, true) => Mode::Always,
            (false, false) => Mode::Auto,
        }
    }
}

/// Redraws per second on a terminal.
const TERM_HZ: u8 = 10;

/// One progress bar over a known number of bytes.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` bytes, labelled `label` (say "cat"), drawn per `mode`.
    pub fn bytes(total: u64, label: &str, mode: Mode) -> Progress {
        let target = match mode {
            Mode::Never => ProgressDrawTarget::hidden(),
            Mode::Auto => ProgressDrawTarget::stderr_with_hz(TERM_HZ),
            Mode::Always => {
                let t = ProgressDrawTarget::stderr_with_hz(TERM_HZ);
                if t.is_hidden() {
                    // Not a terminal: whole lines, once a second, for logs.
                    ProgressDrawTarget::term_like_with_hz(Box::new(PlainLines::default()), 1)
                } else {
                    t
                }
            }
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix}: [{wide_bar}] {binary_bytes}/{binary_total_bytes} \
                 ({binary_bytes_per_sec}, ETA {eta})",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        Progress { bar }
    }

    /// `n` more bytes are done.
    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }

    /// The work is over: draw the final state (it stays on the screen). If fewer bytes
    /// than the total were done (say the reader of a pipe went away), the bar shows
    /// where it stopped rather than claiming the whole.
    pub fn finish(&self) {
        if self
            .bar
            .length()
            .is_some_and(|len| self.bar.position() < len)
        {
            self.bar.abandon();
        } else {
            self.bar.finish();
        }
    }

    /// Run `f` (which prints to stderr, say a warning) with the bar out of the way.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// True when nothing is drawn (`--quiet`, or not a terminal without `--progress`).
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            // Stopped early: leave the bar as it is and end its line, so that the
            // error message the caller prints next starts on a line of its own.
            self.bar.abandon();
            if !self.bar.is_hidden() {
                let _ = writeln!(std::io::stderr());
            }
        }
    }
}

/// A stand-in terminal for `--progress` when stderr is not one: each redraw becomes one
/// plain line (no carriage returns, no cursor movement, no padding).
#[derive(Debug, Default)]
struct PlainLines {
    line: Mutex<String>,
}

impl TermLike for PlainLines {
    fn width(&self) -> u16 {
        80
    }
    fn move_cursor_up(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)?;
        self.flush()
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.line
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let text = std::mem::take(&mut *self.line.lock().unwrap_or_else(|e| e.into_inner()));
        let text = text.replace('\r', "");
        let text = text.trim_end();
        if text.is_empty() {
            return Ok(());
        }
        let mut err = std::io::stderr().lock();
        writeln!(err, "{text}")?;
        err.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_to_mode() {
        assert_eq!(Mode::from_flags(false, false), Mode::Auto);
        assert_eq!(Mode::from_flags(false, true), Mode::Always);
        assert_eq!(Mode::from_flags(true, false), Mode::Never);
    }

    #[test]
    fn plain_lines_drop_padding_and_carriage_returns() {
        let t = PlainLines::default();
        t.write_str("\r").unwrap();
        t.write_str("cat: 1 MiB   ").unwrap();
        assert_eq!(t.line.lock().unwrap().as_str(), "\rcat: 1 MiB   ");
        // flush writes the cleaned line to stderr and empties the buffer.
        t.flush().unwrap();
        assert!(t.line.lock().unwrap().is_empty());
    }

    #[test]
    fn never_is_hidden() {
        let p = Progress::bytes(100, "t", Mode::Never);
        assert!(p.is_hidden());
        p.add(50);
        p.finish();
    }
}

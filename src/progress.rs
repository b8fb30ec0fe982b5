//! Progress of long byte-copying work (`cat`, and later `convert`, `merge`, `compact`):
//! a bar with bytes, rate and ETA on stderr when stderr is a terminal, nothing in pipes
//! and scripts. `--quiet` turns it off, `--progress` forces it; forced onto something
//! that is not a terminal it prints a plain line at most once a second (and the last
//! state at the end) instead of redrawing.
//!
//! A command makes one `Progress` with the total, calls `add` as bytes are done and
//! `finish` at the end; if it returns early (an error), dropping the `Progress` leaves
//! the bar where it stopped and the error line follows on a line of its own.
//!
//! The library's long verbs (`merge`, `compact`, `resize`, `set_parent`) report through
//! an [`Observer`] instead (phases of bytes, warnings); `Bars` is the command line's
//! observer, one `Progress` per phase.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

use crate::defect::Warning;

/// The progress handle of the library's verbs that take one (`merge`, `compact`,
/// `resize`, `set_parent`): told of each phase of byte-copying work as it starts, of the
/// bytes done, of its end, and of warnings as they arise (the work goes on). Every method
/// does nothing by default; `&()` observes nothing.
pub trait Observer: Sync {
    /// A phase of `total` bytes starts (`"merge"`, `"compact: scan"`, `"compact: move"`).
    fn begin(&self, _phase: &'static str, _total: u64) {}
    /// `bytes` more of the current phase are done.
    fn advance(&self, _bytes: u64) {}
    /// The current phase is over (done, interrupted or failed).
    fn end(&self) {}
    /// Something the caller should know about what the verb goes on to do.
    fn warning(&self, _warning: &Warning) {}
}

impl Observer for () {}

/// The command line's observer: a `Progress` bar per phase, drawn per `mode`, and
/// warnings handed to `warn` (each command prints them its way).
pub struct Bars<'a> {
    mode: Mode,
    bar: Mutex<Option<Progress>>,
    warn: &'a (dyn Fn(&Warning) + Sync),
}

impl<'a> Bars<'a> {
    pub fn new(mode: Mode, warn: &'a (dyn Fn(&Warning) + Sync)) -> Bars<'a> {
        Bars {
            mode,
            bar: Mutex::new(None),
            warn,
        }
    }

    fn bar(&self) -> std::sync::MutexGuard<'_, Option<Progress>> {
        self.bar.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Observer for Bars<'_> {
    fn begin(&self, phase: &'static str, total: u64) {
        let mut bar = self.bar();
        if let Some(p) = bar.take() {
            p.finish();
        }
        *bar = Some(Progress::bytes(total, phase, self.mode));
    }
    fn advance(&self, bytes: u64) {
        if let Some(p) = &*self.bar() {
            p.add(bytes);
        }
    }
    fn end(&self) {
        if let Some(p) = self.bar().take() {
            p.finish();
        }
    }
    fn warning(&self, warning: &Warning) {
        (self.warn)(warning)
    }
}

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
/// Time between two plain lines (`--progress` when stderr is not a terminal).
const PLAIN_EVERY: Duration = Duration::from_secs(1);

/// One progress bar over a known number of bytes.
pub struct Progress {
    bar: ProgressBar,
    /// A terminal bar: its line has no newline of its own, so the end of the work adds
    /// one (the shell's prompt or an error message then starts on a fresh line).
    on_terminal: bool,
    /// Plain lines: the last state is written at the end even if it is not due yet.
    plain: Option<Arc<PlainLines>>,
}

impl Progress {
    /// A bar for `total` bytes, labelled `label` (say "cat"), drawn per `mode`.
    pub fn bytes(total: u64, label: &str, mode: Mode) -> Progress {
        let terminal = ProgressDrawTarget::stderr_with_hz(TERM_HZ);
        let on_terminal = mode != Mode::Never && !terminal.is_hidden();
        let mut plain = None;
        let target = match mode {
            Mode::Never => ProgressDrawTarget::hidden(),
            Mode::Auto => terminal,
            Mode::Always if on_terminal => terminal,
            Mode::Always => {
                let p = Arc::new(PlainLines::default());
                plain = Some(p.clone());
                ProgressDrawTarget::term_like(Box::new(PlainTarget(p)))
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
        Progress {
            bar,
            on_terminal,
            plain,
        }
    }

    /// `n` more bytes are done.
    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }

    /// The work is over: draw the final state (it stays on the screen). If fewer bytes
    /// than the total were done (say the reader of a pipe went away), the bar shows
    /// where it stopped rather than claiming the whole.
    pub fn finish(&self) {
        if self.bar.is_finished() {
            return;
        }
        if self
            .bar
            .length()
            .is_some_and(|len| self.bar.position() < len)
        {
            self.bar.abandon();
        } else {
            self.bar.finish();
        }
        self.end_line();
    }

    /// True when nothing is drawn (`--quiet`, or not a terminal without `--progress`).
    #[cfg(test)]
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    fn end_line(&self) {
        if self.on_terminal {
            let _ = writeln!(std::io::stderr());
        }
        if let Some(p) = &self.plain {
            p.write_pending();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            // Stopped early (an error): leave the bar as it is and end its line, so
            // the error message the caller prints next starts on a line of its own.
            self.bar.abandon();
            self.end_line();
        }
    }
}

/// The state of `--progress` lines when stderr is not a terminal: indicatif's redraws
/// arrive as text (with a carriage return and padding), the newest is kept, and one is
/// written as a plain line when a second has passed since the last.
#[derive(Debug, Default)]
struct PlainLines {
    state: Mutex<PlainState>,
}

#[derive(Debug, Default)]
struct PlainState {
    /// The redraw being assembled (between two flushes).
    partial: String,
    /// The newest complete redraw not written yet.
    pending: Option<String>,
    last_written: Option<Instant>,
}

impl PlainLines {
    fn lock(&self) -> std::sync::MutexGuard<'_, PlainState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, s: &str) {
        self.lock().partial.push_str(s);
    }

    /// A redraw is complete: keep it, and write it if one is due.
    fn redraw_done(&self) -> std::io::Result<()> {
        let mut st = self.lock();
        let text = std::mem::take(&mut st.partial);
        let text = text.replace('\r', "");
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        st.pending = Some(text.to_string());
        let due = st.last_written.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
        if due {
            Self::write(&mut st)?;
        }
        Ok(())
    }

    /// Write the newest state if it has not been written (the end of the work).
    fn write_pending(&self) {
        let _ = Self::write(&mut self.lock());
    }

    fn write(st: &mut PlainState) -> std::io::Result<()> {
        if let Some(line) = st.pending.take() {
            st.last_written = Some(Instant::now());
            let mut err = std::io::stderr().lock();
            writeln!(err, "{line}")?;
            err.flush()?;
        }
        Ok(())
    }
}

/// indicatif's view of `PlainLines`: a terminal without cursor movement.
#[derive(Debug)]
struct PlainTarget(Arc<PlainLines>);

impl TermLike for PlainTarget {
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
        self.0.push(s);
        self.0.redraw_done()
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.0.push(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.redraw_done()
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
    fn plain_lines_keep_the_newest_redraw_and_write_one_per_second() {
        let p = PlainLines::default();
        p.push("\rcat: 1 MiB   ");
        p.redraw_done().unwrap();
        // The first redraw is written at once.
        assert!(p.lock().pending.is_none() && p.lock().last_written.is_some());
        p.push("\rcat: 2 MiB   ");
        p.redraw_done().unwrap();
        p.push("\rcat: 3 MiB   ");
        p.redraw_done().unwrap();
        // Within the second: kept, cleaned of the carriage return and padding.
        assert_eq!(p.lock().pending.as_deref(), Some("cat: 3 MiB"));
        p.write_pending();
        assert!(p.lock().pending.is_none());
    }

    #[test]
    fn never_is_hidden() {
        let p = Progress::bytes(100, "t", Mode::Never);
        assert!(p.is_hidden());
        p.add(50);
        p.finish();
    }
}

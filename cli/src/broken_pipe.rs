//! Output into a closed pipe (`oxcow info x | head -1`): the C tools die
//! of SIGPIPE there, quietly. Rust's runtime ignores SIGPIPE, so the
//! failed write surfaces as a panic in `print!`; this hook turns exactly
//! that panic into the C tools' ending.

use std::panic::PanicHookInfo;

pub fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if is_broken_pipe(info) {
            // Dies of the signal, as a C program would; exit status 141
            // (128 + SIGPIPE) if the signal cannot be raised.
            let _ = signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGPIPE);
            std::process::exit(128 + signal_hook::consts::SIGPIPE);
        }
        default(info);
    }));
}

fn is_broken_pipe(info: &PanicHookInfo<'_>) -> bool {
    let p = info.payload();
    let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
    msg.is_some_and(|m| m.starts_with("failed printing to std") && m.contains("Broken pipe"))
}

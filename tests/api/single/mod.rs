//! One instance, one file per area: in-process, or the real binary for settings.

mod http_surface;
mod hub;
mod limits;
mod long_polling;
mod negotiate;
mod robustness;
mod settings;
mod shutdown;
mod sse;
mod timeouts;
mod websockets;

//! The demo application: the hubs a template user replaces with their own. `main.rs`
//! mounts them; nothing in the infrastructure imports this module.
//!
//! - [`chat`]: the chat page's hub at `/chat`;
//! - [`notifications`]: topics and notifications at `/notifications`.

pub mod chat;
pub mod notifications;

use actix_web::http::header::AUTHORIZATION;
use actix_web::HttpRequest;

use crate::{App, Settings};

/// The demo as `main.rs` mounts it — the chat hub at `/chat` and the notifications hub
/// at `/notifications`, users named by their bearer token — for tests that start it in
/// process.
pub fn app(settings: Settings) -> App {
    let chat = chat::hub(&settings);
    App::new(settings)
        .hub("/chat", chat)
        .hub("/notifications", notifications::hub())
        .user_id(user_id)
}

/// The demo's user hook: the bearer token (or, for browsers' WebSockets and SSE, the
/// `access_token` query parameter) **is** the user id. This is not authentication; a real
/// application verifies its tokens here.
pub fn user_id(req: &HttpRequest) -> Option<String> {
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let query = || {
        actix_web::web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .ok()?
            .into_inner()
            .into_iter()
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v)
    };
    bearer
        .or_else(query)
        .map(|user| user.trim().chars().take(chat::MAX_NAME).collect::<String>())
        .filter(|user| !user.is_empty())
}

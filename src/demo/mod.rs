//! The demo application: the hubs a template user replaces with their own, and the one
//! function that mounts them ([`app`]). `main.rs` chooses this demo; nothing in the
//! infrastructure imports it.
//!
//! - [`chat`]: the chat page's hub at `/chat`.

pub mod chat;

use actix_web::http::header::AUTHORIZATION;
use actix_web::HttpRequest;

use crate::{App, Settings};

/// The demo: the chat hub at `/chat`, users named by their bearer token.
pub fn app(settings: Settings) -> App {
    App::new(settings)
        .hub("/chat", chat::hub())
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

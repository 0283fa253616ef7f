//! Text in and out of a model: tokenizers (bytes, Hugging Face) with their settings, and chat
//! templates.

pub mod chat;
pub mod tokenizer;

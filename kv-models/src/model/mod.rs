//! The models: their config, the decoder and its stacks (Llama blocks, YOCO), each block's
//! attention and feed-forward, what a model keeps between calls, generation and sampling.

pub mod attention;
pub mod block;
pub mod config;
pub mod decoder;
pub mod ffn;
pub mod generate;
pub mod llama;
pub mod ordinal;
pub mod sampling;
pub mod state;
pub mod yoco;

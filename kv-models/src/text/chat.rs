//! Chat templates: a model's own Jinja template rendered the way Hugging Face's
//! `apply_chat_template` renders it (trimmed blocks, Python string methods, `raise_exception`).

use crate::text::tokenizer::{ChatMessage, TextConfig};
use kv_core::{KvError, Result};

/// Work a render may do before it fails, whatever the messages: minijinja charges one unit per
/// instruction and about one per 64 bytes of data a template creates, so this bounds a hostile
/// template (a loop of 10^10 steps, a string doubled forty times) to about a second and 64 MiB.
/// Real templates over a few turns use a few thousand.
pub const CHAT_TEMPLATE_FUEL: u64 = 1_000_000;

/// Fuel for rendering `messages`: [`CHAT_TEMPLATE_FUEL`] plus one unit per 4 bytes of their
/// text, so a long conversation is never refused by a template that only copies it.
fn fuel_for(messages: &[ChatMessage]) -> u64 {
    let bytes: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum();
    CHAT_TEMPLATE_FUEL + bytes as u64 / 4
}

/// Renders `template` for `messages`; `add_generation_prompt` opens the assistant's turn.
#[cfg(feature = "hf-tokenizer")]
pub(crate) fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    text: &TextConfig,
) -> Result<String> {
    use minijinja::syntax::SyntaxConfig;
    use minijinja::value::Serde;
    use minijinja::{Environment, Error, ErrorKind, context};
    let mut env = Environment::new();
    // transformers compiles chat templates with trim_blocks and lstrip_blocks.
    let syntax = SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_fuel(Some(fuel_for(messages)));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template("chat", template).map_err(|e| {
        KvError::config(
            "chat template",
            "unparsable",
            format!("Jinja that minijinja reads: {e}"),
        )
    })?;
    let ctx = context! {
        messages => Serde(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => text.bos_token.clone().unwrap_or_default(),
        eos_token => text.eos_token.clone().unwrap_or_default(),
    };
    let text = env
        .get_template("chat")
        .and_then(|t| t.render(ctx))
        .map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => KvError::config(
                "chat template",
                "ran past its budget",
                format!(
                    "a template that renders these messages within {} steps (about 64 bytes of text a step): {e}",
                    fuel_for(messages)
                ),
            ),
            _ => KvError::config(
                "chat template",
                "failed to render",
                format!("a template that renders these messages: {e}"),
            ),
        })?;
    if text.is_empty() {
        return Err(KvError::config(
            "chat template",
            "rendered nothing",
            "a template that writes the messages into the prompt",
        ));
    }
    Ok(text)
}

/// Renders a chat template (not compiled into this build).
#[cfg(not(feature = "hf-tokenizer"))]
pub(crate) fn render(
    _template: &str,
    _messages: &[ChatMessage],
    _add_generation_prompt: bool,
    _text: &TextConfig,
) -> Result<String> {
    Err(KvError::config(
        "chat template",
        "set",
        "a build with the hf-tokenizer feature, which renders Jinja templates",
    ))
}

#[cfg(all(test, feature = "hf-tokenizer"))]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_with_the_default_system_turn_and_the_generation_prompt() {
        let m = [ChatMessage::new("user", "Hi?")];
        let out = render(CHATML, &m, true, &TextConfig::default()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = render(CHATML, &m, false, &TextConfig::default()).unwrap();
        assert!(out.ends_with("Hi?<|im_end|>\n"), "{out}");
    }

    #[test]
    fn templates_use_python_methods_trimmed_blocks_and_can_raise() {
        let text = TextConfig {
            bos_token: Some("<s>".into()),
            ..Default::default()
        };
        // Llama-2 style: bos_token, .strip(), a raise for bad roles, and block tags on their own lines.
        let t = "{{ bos_token }}\n{% for m in messages %}\n  {% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}\n[{{ m['role'] }}] {{ m['content'].strip() }}\n{% endfor %}\n";
        let out = render(t, &[ChatMessage::new("user", "  hello  ")], false, &text).unwrap();
        assert_eq!(out, "<s>\n[user] hello\n");
        let e = render(t, &[ChatMessage::new("tool", "x")], false, &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad role tool"), "{e}");
        let e = render("{% for %}", &[], false, &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat template"), "{e}");
    }

    #[test]
    fn endless_and_explosive_templates_run_out_of_fuel_and_an_empty_render_is_an_error() {
        let m = [ChatMessage::new("user", "Hi")];
        let text = TextConfig::default();
        for t in [
            "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "{{ 'ab ' * 30000000 }}",
        ] {
            let start = std::time::Instant::now();
            let e = render(t, &m, true, &text).unwrap_err().to_string();
            assert!(e.contains("ran past its budget"), "{t}: {e}");
            assert!(
                start.elapsed().as_secs() < 10,
                "{t} took {:?}",
                start.elapsed()
            );
        }
        let e = render("{% if false %}x{% endif %}", &m, true, &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rendered nothing"), "{e}");
        // A long message is not refused by a template that only copies it.
        let long = [ChatMessage::new("user", &"word ".repeat(200_000))];
        let out = render(CHATML, &long, true, &text).unwrap();
        assert!(out.len() > 1_000_000);
    }
}

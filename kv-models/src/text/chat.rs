//! Chat templates: a model's own Jinja template rendered the way Hugging Face's
//! `apply_chat_template` renders it (trimmed blocks, Python string methods, `raise_exception`).

use crate::text::tokenizer::{ChatMessage, TextConfig};
use kv_core::{KvError, Result};

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
    env.get_template("chat")
        .and_then(|t| t.render(ctx))
        .map_err(|e| {
            KvError::config(
                "chat template",
                "failed to render",
                format!("a template that renders these messages: {e}"),
            )
        })
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
}

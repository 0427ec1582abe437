//! Chat templates: the Jinja program a model ships that turns a list of messages into the exact
//! prompt text it was fine-tuned on.
//!
//! Rendered with minijinja configured the way transformers' `apply_chat_template` configures
//! Jinja2: `trim_blocks` and `lstrip_blocks` on, the trailing newline of the template dropped,
//! loop controls, and the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` plus the function `raise_exception`. Templates are written against Python's
//! Jinja2, so the Python string and dict methods they commonly call (`strip`, `startswith`,
//! `split`, `items`, ...) are provided too.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Serde, Value, ValueKind, from_args};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// transformers' former default template (ChatML), used for models that ship none.
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The name errors give the template.
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template's Jinja source with the special tokens it may refer to.
///
/// The source is compiled at each [`render`](Self::render), so a template that minijinja cannot
/// parse fails only when a chat is rendered, as in transformers, and never stops a model from
/// loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// The variables a template sees. Absent tokens are left undefined rather than `none`, as
/// transformers only passes the special tokens a tokenizer has.
#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [ChatMessage],
    add_generation_prompt: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token: Option<&'a str>,
}

impl ChatTemplate {
    /// A template from its Jinja source and the text of the model's BOS and EOS tokens.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        Self {
            source: source.into(),
            bos_token,
            eos_token,
        }
    }

    /// ChatML (`<|im_start|>role\ncontent<|im_end|>\n` per message), transformers' default
    /// before models had to ship their own template.
    pub fn chatml() -> Self {
        Self::new(CHATML, None, None)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS token's text, as the template sees it in `bos_token`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token's text, as the template sees it in `eos_token`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders `messages`, adding the opening of an assistant turn when
    /// `add_generation_prompt` is set: transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()?,
        );
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(python_method);
        let template = env.template_from_named_str(TEMPLATE_NAME, &self.source)?;
        let context = Context {
            messages,
            add_generation_prompt,
            bos_token: self.bos_token.as_deref(),
            eos_token: self.eos_token.as_deref(),
        };
        Ok(template.render(Serde(&context))?)
    }
}

/// transformers' `raise_exception(message)`: templates call it to reject a chat (a bad role
/// order, say).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The Python `str` and `dict` methods that chat templates call and minijinja lacks.
fn python_method(
    _state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(text) = value.as_str() {
        string_method(text, method, args)
    } else if value.kind() == ValueKind::Map {
        map_method(value, method, args)
    } else {
        Err(Error::from(ErrorKind::UnknownMethod))
    }
}

fn string_method(text: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    Ok(match method {
        "strip" | "lstrip" | "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            let strip = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
            Value::from(match method {
                "strip" => text.trim_matches(strip),
                "lstrip" => text.trim_start_matches(strip),
                _ => text.trim_end_matches(strip),
            })
        }
        "startswith" => {
            let (prefix,): (&str,) = from_args(args)?;
            Value::from(text.starts_with(prefix))
        }
        "endswith" => {
            let (suffix,): (&str,) = from_args(args)?;
            Value::from(text.ends_with(suffix))
        }
        "split" => {
            let (separator,): (Option<&str>,) = from_args(args)?;
            match separator {
                None => text.split_whitespace().map(Value::from).collect(),
                // Python raises on an empty separator; Rust would split between every char.
                Some("") => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"));
                }
                Some(separator) => text.split(separator).map(Value::from).collect(),
            }
        }
        "replace" => {
            let (old, new): (&str, &str) = from_args(args)?;
            Value::from(text.replace(old, new))
        }
        "upper" => {
            from_args::<()>(args)?;
            Value::from(text.to_uppercase())
        }
        "lower" => {
            from_args::<()>(args)?;
            Value::from(text.to_lowercase())
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

fn map_method(map: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    Ok(match method {
        "items" => {
            from_args::<()>(args)?;
            let items: Result<Vec<Value>, Error> = map
                .try_iter()?
                .map(|key| Ok(Value::from(vec![key.clone(), map.get_item(&key)?])))
                .collect();
            Value::from(items?)
        }
        "keys" => {
            from_args::<()>(args)?;
            map.try_iter()?.collect()
        }
        "values" => {
            from_args::<()>(args)?;
            let values: Result<Vec<Value>, Error> =
                map.try_iter()?.map(|key| map.get_item(&key)).collect();
            Value::from(values?)
        }
        "get" => {
            let (key, default): (Value, Option<Value>) = from_args(args)?;
            let value = map.get_item(&key)?;
            if value.is_undefined() {
                default.unwrap_or(Value::from(()))
            } else {
                value
            }
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChatML with a default system prompt, written over several lines the way model authors
    /// do: only `trim_blocks` and `lstrip_blocks` make it render without stray whitespace.
    const CHATML_WITH_SYSTEM: &str = "{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
";

    fn render(source: &str, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        ChatTemplate::new(source, Some("<s>".into()), Some("</s>".into()))
            .render(messages, add_generation_prompt)
            .unwrap()
    }

    #[test]
    fn chatml_adds_the_default_system_prompt() {
        let messages = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            render(CHATML_WITH_SYSTEM, &messages, true),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chatml_keeps_a_given_system_prompt() {
        let messages = [
            ChatMessage::new("system", "Be terse."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello."),
        ];
        assert_eq!(
            render(CHATML_WITH_SYSTEM, &messages, false),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n"
        );
    }

    #[test]
    fn builtin_chatml_matches_the_multiline_one_without_a_default_system() {
        let messages = [
            ChatMessage::new("system", "S"),
            ChatMessage::new("user", "U"),
        ];
        assert_eq!(
            ChatTemplate::chatml().render(&messages, true).unwrap(),
            render(CHATML_WITH_SYSTEM, &messages, true)
        );
    }

    #[test]
    fn special_tokens_are_passed_and_absent_ones_undefined() {
        let source = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}\
                      {% if bos_token is defined %}!{% endif %}";
        let messages = [ChatMessage::new("user", "x")];
        assert_eq!(render(source, &messages, false), "<s>x</s>!");
        let bare = ChatTemplate::new(source, None, None);
        assert_eq!(bare.render(&messages, false).unwrap(), "x");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let source = "{% if messages[0]['role'] != 'user' %}\
                      {{ raise_exception('Conversations must start with a user message') }}\
                      {% endif %}ok";
        let template = ChatTemplate::new(source, None, None);
        assert_eq!(
            template
                .render(&[ChatMessage::new("user", "x")], false)
                .unwrap(),
            "ok"
        );
        let err = template
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
        assert!(
            err.to_string()
                .contains("Conversations must start with a user message"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_template_is_an_error() {
        let template = ChatTemplate::new("{% for m in messages %}", None, None);
        let err = template
            .render(&[ChatMessage::new("user", "x")], false)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
    }

    #[test]
    fn python_string_and_dict_methods_work() {
        let source = "{% set m = messages[0] %}[{{ m.content.strip() }}][{{ m.content.lstrip(' <') }}]\
                      {% if m.content.strip().startswith('a') and m.content.endswith(' ') %}[sw]{% endif %}\
                      [{{ m.content.split('b')[-1] }}][{{ m.content.split()|length }}]\
                      [{{ m.content.replace('a', 'A').upper() }}][{{ m.get('role') }}]\
                      [{{ m.get('missing', 'none') }}][{{ m.keys()|length }}]\
                      [{% for k, v in m.items() %}{{ k }}{% endfor %}]";
        let messages = [ChatMessage::new("user", " a b c ")];
        assert_eq!(
            render(source, &messages, false),
            "[a b c][a b c ][sw][ c ][3][ A B C ][user][none][2][rolecontent]"
        );
    }
}

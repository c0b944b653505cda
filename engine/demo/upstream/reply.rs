//! What the demo model answers: a deterministic reply to the prompt, its stream deltas and the
//! token counts, plus the ids and timestamps responses carry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::prompt::Prompt;

/// How much of the prompt the reply echoes, in chars.
const SNIPPET_CHARS: usize = 40;
/// Pause between streamed words, so streaming is visible in a terminal.
pub const WORD_DELAY: Duration = Duration::from_millis(20);

/// The answer to one prompt.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    /// `Ringway demo reply to: <first 40 chars of the last user message>`, whitespace
    /// collapsed.
    pub text: String,
    /// `ceil(prompt chars / 4)`: a documented estimate, not a tokenizer.
    pub prompt_tokens: usize,
}

impl Reply {
    /// The reply to `p`.
    pub fn to(p: &Prompt) -> Reply {
        let snippet: String = p.last_user.chars().take(SNIPPET_CHARS).collect();
        let snippet = snippet.split_whitespace().collect::<Vec<_>>().join(" ");
        let text = if snippet.is_empty() {
            "Ringway demo reply to: (empty prompt)".to_string()
        } else {
            format!("Ringway demo reply to: {snippet}")
        };
        Reply {
            text,
            prompt_tokens: p.prompt_chars.div_ceil(4),
        }
    }

    /// The reply split into stream deltas: one per word, each after the first with its leading
    /// space, so the deltas concatenate to exactly the non-streamed reply.
    pub fn deltas(&self) -> Vec<String> {
        self.text
            .split_whitespace()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    w.to_string()
                } else {
                    format!(" {w}")
                }
            })
            .collect()
    }

    /// One token per word: the number of deltas a streamed reply carries.
    pub fn completion_tokens(&self) -> usize {
        self.text.split_whitespace().count()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique number for response ids.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Seconds since the Unix epoch, for OpenAI's `created`.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(last_user: &str, prompt_chars: usize) -> Prompt {
        Prompt {
            model: "m".into(),
            stream: false,
            include_usage: false,
            last_user: last_user.into(),
            prompt_chars,
        }
    }

    #[test]
    fn reply_echoes_the_first_40_chars_collapsed() {
        let r = Reply::to(&prompt(
            "Hello there, \"gateway\"!\nHow are you today, my friend? Tell me more please.",
            9,
        ));
        assert_eq!(
            r.text,
            "Ringway demo reply to: Hello there, \"gateway\"! How are you toda"
        );
        assert_eq!(r.prompt_tokens, 3);
        assert_eq!(r.completion_tokens(), 11);
        assert_eq!(r.deltas().len(), r.completion_tokens());
        assert_eq!(r.deltas().concat(), r.text);
        assert_eq!(r.deltas()[1], " demo");
        let empty = Reply::to(&prompt(" \n\t", 0));
        assert_eq!(empty.text, "Ringway demo reply to: (empty prompt)");
        assert_eq!(empty.prompt_tokens, 0);
        // Chars, not bytes: 40 multi-byte chars are echoed whole.
        let wide = "é".repeat(50);
        assert_eq!(
            Reply::to(&prompt(&wide, 50)).text,
            format!("Ringway demo reply to: {}", "é".repeat(40))
        );
    }
}

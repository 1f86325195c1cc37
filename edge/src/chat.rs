//! `tandem-edge chat`: a conversation's history and statistics. The
//! terminal loop is in the binary; this is what it keeps between turns.

use crate::{EdgeError, Generation};
use tandem_model::{ChatMessage, Tokenizer};
use tandem_protocol::limits::MAX_PROMPT_TOKENS;

/// Today's date (UTC) as chat templates that ask for it write it.
pub fn today() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    tandem_model::template_date(now)
}

/// The turns so far and running totals of the speculation.
#[derive(Default)]
pub struct Conversation {
    system: Option<String>,
    turns: Vec<ChatMessage>,
    totals: Totals,
    last: Option<Generation>,
}

#[derive(Default)]
struct Totals {
    answers: usize,
    tokens: usize,
    rounds: usize,
    drafted: usize,
    accepted: usize,
    wasted_draft_ms: f64,
}

impl Conversation {
    pub fn new(system: Option<String>) -> Self {
        Conversation { system, ..Default::default() }
    }

    /// Adds the user's turn and returns the prompt for the answer, dated
    /// `today` (see [`Tokenizer::chat_messages`]). The oldest exchanges
    /// are dropped when the whole would exceed the protocol's prompt
    /// limit.
    pub fn ask(&mut self, user: &str, tokenizer: &Tokenizer, today: &str) -> Result<Vec<u32>, EdgeError> {
        self.turns.push(ChatMessage { role: "user".into(), content: user.into() });
        loop {
            let mut messages: Vec<ChatMessage> = self.system.iter().map(|s| ChatMessage { role: "system".into(), content: s.clone() }).collect();
            messages.extend(self.turns.iter().cloned());
            let prompt = tokenizer.encode_prompt(&tokenizer.chat_messages(&messages, Some(today)))?;
            if prompt.len() <= MAX_PROMPT_TOKENS {
                return Ok(prompt);
            }
            if self.turns.len() <= 1 {
                self.turns.clear();
                return Err(EdgeError::InvalidArgument(format!("the message is {} tokens with the chat template; at most {MAX_PROMPT_TOKENS}", prompt.len())));
            }
            // Drop the oldest exchange (a user turn and its answer).
            self.turns.drain(..2.min(self.turns.len() - 1));
        }
    }

    /// Records the answer to the last question (a cancelled one too: what
    /// was shown stays in the history).
    pub fn answered(&mut self, text: &str, g: Generation) {
        self.turns.push(ChatMessage { role: "assistant".into(), content: text.into() });
        let t = &mut self.totals;
        t.answers += 1;
        t.tokens += g.tokens.len();
        t.rounds += g.rounds;
        t.drafted += g.drafted;
        t.accepted += g.accepted;
        t.wasted_draft_ms += g.wasted_draft_ms;
        self.last = Some(g);
    }

    /// A question that got no answer (the generation failed) leaves no turn.
    pub fn unanswered(&mut self) {
        if self.turns.last().is_some_and(|m| m.role == "user") {
            self.turns.pop();
        }
    }

    pub fn reset(&mut self) {
        self.turns.clear();
    }

    pub fn turns(&self) -> &[ChatMessage] {
        &self.turns
    }

    /// The `/stats` report.
    pub fn stats(&self) -> String {
        let t = &self.totals;
        let rate = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let mut s = match &self.last {
            Some(g) => format!(
                "last answer: {} tokens in {:.0} ms (first after {:.0} ms), {} rounds, acceptance {:.1} %, {:.2} tokens/round, wasted drafting {:.0} ms, RTT {:.1} ms{}\n",
                g.tokens.len(),
                g.wall_ms,
                g.ttft_ms,
                g.rounds,
                100.0 * g.acceptance_rate,
                g.tokens_per_round,
                g.wasted_draft_ms,
                g.mean_rtt_ms,
                if g.cancelled { " (cancelled)" } else { "" }
            ),
            None => "no answer yet\n".to_string(),
        };
        s.push_str(&format!(
            "conversation: {} turns in history, {} answers, {} tokens, {} drafted, {} accepted ({:.1} %), {:.2} tokens/round, wasted drafting {:.0} ms",
            self.turns.len(),
            t.answers,
            t.tokens,
            t.drafted,
            t.accepted,
            100.0 * rate(t.accepted, t.drafted),
            rate(t.tokens.saturating_sub(t.answers), t.rounds),
            t.wasted_draft_ms
        ));
        s
    }
}

//! The tokenizer built from the default model's GGUF metadata.

mod common;

use common::default_model;

#[test]
fn fixed_ids_match_the_reference_tokenizer() {
    let tok = default_model().tokenizer;
    // No space is prepended ("Hello" is one token, not "ĠHello").
    assert_eq!(tok.encode("Hello").unwrap(), vec![19556]);
    assert_eq!(tok.encode("Hello world").unwrap(), vec![19556, 905]);
    assert_eq!(tok.encode("What is the capital of France?").unwrap(), vec![1780, 314, 260, 3575, 282, 4649, 47]);
    // Digits are split one by one (SmolLM's pre-tokenizer).
    assert_eq!(tok.encode("12345").unwrap(), vec![33, 34, 35, 36, 37]);
    // Special tokens in the text become their ids.
    assert_eq!(tok.encode("<|im_start|>user\nHi<|im_end|>\n").unwrap(), vec![1, 4093, 198, 26843, 2, 198]);
    assert_eq!(tok.bos_token(), Some(1));
    assert!(tok.eos_tokens().contains(&2));
}

#[test]
fn round_trips_unicode_code_and_chat_text() {
    let tok = default_model().tokenizer;
    let texts = [
        "Grüße aus Köln — naïve café, 東京, emoji 🦀🚀, ελληνικά",
        "def add(a, b):\n\treturn a + b  # sum\n\nprint(add(2, 40))\n",
        "   leading spaces, trailing\n\n\n",
        &tok.chat_prompt("Explain Rust's borrow checker in one line."),
    ];
    for text in texts {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "ids {ids:?}");
        // Streaming decode gives the same text, split characters held back.
        let mut stream = tok.stream();
        let streamed: String = ids.iter().map(|&i| stream.push(i).unwrap()).collect();
        let specials_removed: Vec<u32> = ids.iter().copied().filter(|&i| !tok.is_special(i)).collect();
        assert_eq!(streamed, tok.decode(&specials_removed).unwrap());
    }
}

#[test]
fn chat_template_is_chatml_with_default_system_message() {
    let tok = default_model().tokenizer;
    assert_eq!(
        tok.chat_prompt("Hi"),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ); // A conversation: its own system turn replaces the default one.
    let turn = |role: &str, content: &str| tandem_model::ChatMessage { role: role.into(), content: content.into() };
    assert_eq!(
        tok.chat_messages(&[turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello."), turn("user", "Bye")], None),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
}

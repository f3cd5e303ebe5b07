//! Text as tokens arrive, for streaming: each new token's text is the difference between decoding a
//! short window of recent tokens with and without it (as HF's TextStreamer and TGI do), so that
//! multi-token characters and tokenizers that strip or merge spaces come out whole. Stop strings are
//! held back until they can no longer start in the held text.

use tokenizers::Tokenizer;

pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens before this one have had their text produced.
    read_offset: usize,
    /// Text produced and not yet released (it may be the start of a stop string).
    held: String,
    stop: Vec<String>,
    /// The longest stop string, in bytes (0: none).
    hold_back: usize,
    /// A stop string was found: nothing after it is released.
    stopped: bool,
    /// Everything released so far.
    released: String,
}

impl Detokenizer {
    pub fn new(stop: &[String]) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            held: String::new(),
            stop: stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            hold_back: stop.iter().map(String::len).max().unwrap_or(0),
            stopped: false,
            released: String::new(),
        }
    }

    /// Adds a token; returns the text that can be sent now (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let text = decode(&self.ids[self.prefix_offset..]);
        // An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest of the character.
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            if let Some(new) = text.get(prefix.len()..) {
                self.held.push_str(new);
            }
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        self.release()
    }

    /// The rest of `final_text` (the engine's text, stop strings cut) after what was released.
    pub fn finish(&mut self, final_text: &str) -> String {
        let rest = final_text
            .strip_prefix(self.released.as_str())
            .unwrap_or_default()
            .to_owned();
        self.released = final_text.to_owned();
        self.held.clear();
        rest
    }

    /// Releases held text up to a stop string found in it, else all but as many bytes as the longest
    /// stop string less one (rounded to a character boundary): a stop string that ends in new text
    /// starts within what was kept.
    fn release(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        let mut at = match found {
            Some(at) => {
                self.stopped = true;
                at
            }
            None => self
                .held
                .len()
                .saturating_sub(self.hold_back.saturating_sub(1)),
        };
        while !self.held.is_char_boundary(at) {
            at -= 1;
        }
        let out: String = self.held.drain(..at).collect();
        self.released.push_str(&out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/tokenizer/tokenizer.json"
        );
        Tokenizer::from_file(path).expect("fixture tokenizer")
    }

    #[test]
    fn streamed_pieces_join_to_the_whole_decode() {
        let tokenizer = tokenizer();
        let text = "Hello world, naïve café — 東京 tokens\nsecond line";
        let ids = tokenizer
            .encode(text, false)
            .expect("encodes")
            .get_ids()
            .to_vec();
        let mut detok = Detokenizer::new(&[]);
        let streamed: String = ids.iter().map(|&id| detok.push(&tokenizer, id)).collect();
        let whole = tokenizer.decode(&ids, true).expect("decodes");
        assert_eq!(streamed, whole);
        assert_eq!(detok.finish(&whole), "");
    }

    #[test]
    fn text_that_may_start_a_stop_string_is_held_back() {
        let tokenizer = tokenizer();
        let ids = tokenizer
            .encode("one two three", false)
            .expect("encodes")
            .get_ids()
            .to_vec();
        let mut detok = Detokenizer::new(&["three".into()]);
        let streamed: String = ids.iter().map(|&id| detok.push(&tokenizer, id)).collect();
        // "three" (5 bytes) keeps the last 4 bytes back; the engine's final text cuts the stop string.
        assert!(!streamed.contains("thr"), "{streamed:?}");
        let rest = detok.finish("one two ");
        assert_eq!(format!("{streamed}{rest}"), "one two ");
    }
}
